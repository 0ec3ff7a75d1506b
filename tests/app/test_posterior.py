"""``diverse posterior``: a tiny study end to end (table, plots, HTML, reuse) and bad input."""

import csv

import pytest
import torch

from diverse.app.cli import main
from diverse.app.posterior import (
    load_posterior_config,
    mmd_value,
    posterior_config,
    run_specs,
    summarize,
)
from diverse.errors import UserError
from diverse.nets.samples import base_model, flatten, load_samples

TINY = """
[study]
methods = ["de", "swag"]
reference = 12
members = 2
samples = 4
seeds = 1
ood = "flipped"

[data]
name = "digits"
train_subset = 200
test_subset = 60

[model]
name = "mlp"
hidden = [6]
activation = "relu"

[ensemble]
execution = "vmap"

[train]
epochs = 2
batch_size = 50
lr = 0.01
prior_std = 1.0
eval_every = 0

[overrides]
swag = ["method.swa_start=0.0", "method.swa_frequency=1", "method.rank=3"]
"""


def test_tiny_study_writes_its_table_plots_and_html_and_reuses_runs(tmp_path, capsys):
    config = tmp_path / "study.toml"
    config.write_text(TINY)
    out = tmp_path / "out"
    assert main(["posterior", str(config), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [(r["method"], r["mode"], r["samples"]) for r in rows] == [
        ("de", "multi", "4"), ("swag", "single", "4"), ("swag", "multi", "4")]
    # the table's MMD is the MMD of the saved samples against the saved reference
    ref, _ = load_samples(out / "reference")
    pc = load_posterior_config(config)
    cfg = run_specs(pc)[1].cfg
    run_samples, _ = load_samples(out / "runs" / "swag-single-seed0")
    from diverse.data.datasets import load_dataset
    from diverse.nets.likelihoods import build_likelihood

    skeleton = base_model(cfg, load_dataset(cfg.data), build_likelihood(cfg.likelihood))
    assert float(rows[1]["mmd"]) == pytest.approx(
        mmd_value(flatten(run_samples, skeleton), flatten(ref, skeleton)), rel=1e-9)
    assert ref.count == 12 and 0 <= float(rows[0]["accuracy"]) <= 1
    md = (out / "results.md").read_text()
    assert "| method | mode | seeds | MMD² | MMD² (NS) | accuracy |" in md
    assert "| swag | multi | 1 |" in md and "Noise floor" in md
    for plot in ("mmd.png", "pca.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    assert (out / "results.html").read_text().count("data:image/png;base64,") == 2
    stamp = (out / "runs" / "swag-multi-seed0" / "row.json").stat().st_mtime_ns
    ref_stamp = (out / "reference" / "checkpoints" / "latest.json").stat().st_mtime_ns
    assert main(["posterior", str(config), "--out", str(out), "--quiet"]) == 0
    assert (out / "runs" / "swag-multi-seed0" / "row.json").stat().st_mtime_ns == stamp
    assert (out / "reference" / "checkpoints" / "latest.json").stat().st_mtime_ns == ref_stamp
    assert list(csv.DictReader((out / "results.csv").read_text().splitlines())) == rows


def test_summary_is_mean_and_sample_std_over_seeds():
    rows = [{"method": "vi", "mode": "multi", **{c: v for c in (
        "mmd", "mmd_ns", "accuracy", "ece", "ace", "brier", "nll", "aupr", "fpr95", "mi_in",
        "mi_out")}} for v in (1.0, 2.0, 4.0)]
    (entry,) = summarize(rows)
    assert entry["seeds"] == 3
    assert entry["mmd"][0] == pytest.approx(7 / 3)
    assert entry["mmd"][1] == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).std().item())


def test_run_specs_give_every_method_equal_sample_counts():
    pc = posterior_config({"study": {"methods": ["de", "vi", "laplace"], "members": 5,
                                     "samples": 20, "seeds": 2, "reference": 30}})
    specs = run_specs(pc)
    assert [(s.method, s.mode, s.seed) for s in specs[:5]] == [
        ("de", "multi", 0), ("vi", "single", 0), ("vi", "multi", 0), ("laplace", "single", 0),
        ("laplace", "multi", 0)]
    assert len(specs) == 10
    for s in specs:
        draws = getattr(s.cfg.method, "predict_samples", 1)
        assert s.cfg.ensemble.members * draws == 20 and s.cfg.train.seed == s.seed
    assert pc.run["data"]["ood"] == ["rotated"]


@pytest.mark.parametrize(("raw", "message"), [
    ({"study": {"samples": 5, "members": 2}}, "samples = 5: must be a multiple of members = 2"),
    ({"study": {"methods": ["de", "svgd"]}}, "methods = 'svgd': allowed de, mc-dropout"),
    ({"study": {"samples": 100, "reference": 50}}, "samples = 100: must be smaller than"),
    ({"study": {"scaling": "magic"}}, "scaling = 'magic': allowed min-mass, unit-norm, none"),
    ({"study": {"members": 1}}, "members = 1: must be an integer >= 2"),
    ({"runs": {}}, "unknown section \\[runs\\]"),
    ({"overrides": {"vi": ["model.hidden=[4]"]}}, "changes model.hidden, which the study fixes"),
    ({"overrides": {"vi": ["method.predict_samples=3"]}}, "changes method.predict_samples"),
    ({"study": {"methods": ["de"]}, "overrides": {"vi": []}}, "'vi' is not in \\[study\\] methods"),
])
def test_bad_study_configs_raise_one_line_user_errors(raw, message):
    with pytest.raises(UserError, match=message):
        posterior_config(raw)


def test_bad_input_on_the_command_line_exits_2_before_writing(tmp_path, capsys):
    config = tmp_path / "study.toml"
    config.write_text(TINY.replace('activation = "relu"', 'activation = "tanh"'))
    out = tmp_path / "out"
    assert main(["posterior", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diverse: error:") and "\n" not in err and "canonical scaling" in err
    assert not out.exists()
    assert main(["posterior", str(config), "--set", "study.scaling=none", "--set",
                 "overrides.swag=[\"model.dropout=0.1\"]", "--set", "study.methods=[\"vi\"]",
                 "--out", str(out)]) == 2
    assert "'swag' is not in [study] methods" in capsys.readouterr().err


def test_study_with_an_hmc_reference_and_hmc_as_a_method(tmp_path):
    config = tmp_path / "study.toml"
    config.write_text(TINY.replace('methods = ["de", "swag"]',
                                   'methods = ["de", "hmc"]\nhmc_reference = true\n'
                                   'hmc_chains = 2')
                      .replace('swag = ["method.swa_start=0.0", "method.swa_frequency=1", '
                               '"method.rank=3"]',
                               'hmc = ["method.leapfrog_steps=4", "train.steps=16"]'))
    out = tmp_path / "out"
    assert main(["posterior", str(config), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert [(r["method"], r["mode"]) for r in rows] == [
        ("de", "multi"), ("hmc", "single"), ("hmc", "multi")]
    hmc_ref, manifest = load_samples(out / "hmc-reference")
    assert hmc_ref.count == 12 and manifest["method"] == "hmc" and hmc_ref.members == 2
    pc = load_posterior_config(config)
    cfg = run_specs(pc)[0].cfg
    from diverse.data.datasets import load_dataset
    from diverse.nets.likelihoods import build_likelihood

    skeleton = base_model(cfg, load_dataset(cfg.data), build_likelihood(cfg.likelihood))
    de, _ = load_samples(out / "runs" / "de-multi-seed0")
    assert float(rows[0]["mmd_hmc"]) == pytest.approx(
        mmd_value(flatten(de, skeleton), flatten(hmc_ref, skeleton)), rel=1e-9)
    md = (out / "results.md").read_text()
    assert "MMD² to HMC | MMD² to HMC (NS)" in md and "HMC reference (2 chains" in md
