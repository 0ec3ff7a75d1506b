"""diverse compare: configs × seeds, resumable, one table."""

import csv
import json
import statistics

import pytest

from diverse.app.cli import main
from diverse.app.compare import _training_part, summary_table
from diverse.app.config import config_to_dict, load_config

CONFIG = """[data]
name = "digits"
train_subset = 300
ood = ["uniform"]
[model]
name = "mlp"
hidden = [16]
[ensemble]
members = 2
execution = "vmap"
[method]
{method}
[train]
epochs = 2
batch_size = 32
lr = 0.01
prior_std = 1.0
eval_every = 0
"""


def test_compare_runs_every_config_and_seed_then_reuses_and_resumes(tmp_path, capsys):
    paths = []
    for stem, method in (("tiny_de", 'name = "de"'), ("tiny_wgd", 'name = "wgd"')):
        path = tmp_path / f"{stem}.toml"
        path.write_text(CONFIG.format(method=method))
        paths.append(str(path))
    out = tmp_path / "cmp"
    assert main(["compare", *paths, "--seeds", "2", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count(": trained") == 4
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["config"], r["seed"]) for r in rows] == [
        ("tiny_de", "0"), ("tiny_de", "1"), ("tiny_wgd", "0"), ("tiny_wgd", "1")]
    for r in rows:  # every row is its run's metrics.json
        figures = json.loads((out / r["config"] / f"seed-{r['seed']}" / "metrics.json").read_text())
        assert float(r["accuracy"]) == pytest.approx(figures["accuracy"])
        assert float(r["auroc[uniform]"]) == pytest.approx(figures["ood"]["uniform"]["auroc"])
        config = (out / r["config"] / f"seed-{r['seed']}" / "config.toml").read_text()
        assert f"seed = {r['seed']}" in config
        # training wall time = the sum of the run's epoch times in its checkpoint history
        ckpt = out / r["config"] / f"seed-{r['seed']}" / "checkpoints"
        manifest = json.loads((ckpt / "latest.json").read_text())["manifest"]
        history = json.loads((ckpt / manifest).read_text())["history"]
        assert len(history) == 2
        assert float(r["train_seconds"]) == pytest.approx(sum(h["seconds"] for h in history))
        assert float(r["train_seconds"]) > 0
    accs = [float(r["accuracy"]) for r in rows if r["config"] == "tiny_de"]
    assert accs[0] != accs[1]  # different seeds, different runs
    table = (out / "results.md").read_text()
    mean, std = statistics.mean(accs), statistics.stdev(accs)
    assert f"{mean:.4f} ± {std:.4f}" in table
    # a second call reuses everything; a run without metrics resumes from its checkpoint
    (out / "tiny_wgd" / "seed-1" / "metrics.json").unlink()
    assert main(["compare", *paths, "--seeds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": reused") == 3 and printed.count(": resumed") == 1
    with open(out / "results.csv") as fh:
        again = list(csv.DictReader(fh))
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    # an edited config is not silently answered with the old runs
    assert main(["compare", *paths, "--seeds", "2", "--out", str(out),
                 "--set", "train.lr=0.02"]) == 2
    assert "holds a run of a different config" in capsys.readouterr().err
    # an added OOD set changes no training: the finished runs are evaluated again
    more_ood = ["--set", 'data.ood=["uniform", "gaussian"]']
    assert main(["compare", *paths, "--seeds", "2", "--out", str(out), *more_ood]) == 0
    assert capsys.readouterr().out.count(": re-evaluated") == 4
    with open(out / "results.csv") as fh:
        third = list(csv.DictReader(fh))
    for before, after in zip(rows, third, strict=True):
        for key in ("accuracy", "nll", "auroc[uniform]", "train_seconds"):
            assert float(after[key]) == pytest.approx(float(before[key]), abs=1e-12), key
        assert 0.0 <= float(after["auroc[gaussian]"]) <= 1.0  # a new column
        run_dir = out / after["config"] / f"seed-{after['seed']}"
        assert load_config(run_dir / "config.toml").data.ood == ("uniform", "gaussian")
        figures = json.loads((run_dir / "metrics.json").read_text())
        assert set(figures["ood"]) == {"uniform", "gaussian"}
    assert main(["compare", *paths, "--seeds", "2", "--out", str(out), *more_ood]) == 0
    assert capsys.readouterr().out.count(": reused") == 4


def test_summary_table_marks_the_best_mean_per_column():
    rows = [{"config": "a", "seed": 0, "accuracy": 0.9, "nll": 0.3},
            {"config": "a", "seed": 1, "accuracy": 0.8, "nll": 0.5},
            {"config": "b", "seed": 0, "accuracy": 0.7, "nll": 0.2},
            {"config": "b", "seed": 1, "accuracy": 0.7, "nll": 0.2}]
    table = summary_table(rows).splitlines()
    assert table[2] == "| a | 2 | **0.8500 ± 0.0707** | 0.4000 ± 0.1414 |"
    assert table[3] == "| b | 2 | 0.7000 ± 0.0000 | **0.2000 ± 0.0000** |"
    # diversity / uncertainty columns are reported, never marked best
    rows = [{"config": c, "seed": 0, "disagreement": v, "cka[act1]": v, "train_seconds": v}
            for c, v in (("a", 0.1), ("b", 0.2))]
    assert "**" not in summary_table(rows)


def test_compare_rejects_bad_input_before_running(tmp_path, capsys):
    good = tmp_path / "a.toml"
    good.write_text(CONFIG.format(method='name = "de"'))
    bad = tmp_path / "b.toml"
    bad.write_text(CONFIG.format(method='name = "nope"'))
    assert main(["compare", str(good), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["compare", str(good), "--seeds", "0", "--out", str(tmp_path / "o")]) == 2


def test_prediction_members_and_ood_sets_are_evaluation_only():
    base = ["data.name=digits", "method.name=hyper-he-cka"]
    a = config_to_dict(load_config(None, base))
    b = config_to_dict(load_config(None, [*base, "method.predict_members=20",
                                          'data.ood=["uniform"]']))
    c = config_to_dict(load_config(None, [*base, "method.spread=0.2"]))
    assert a != b and _training_part(a) == _training_part(b)
    assert _training_part(a) != _training_part(c)
