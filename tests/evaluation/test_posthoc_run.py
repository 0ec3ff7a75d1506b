"""Post-hoc calibration end to end: the validation split, the run directory's
calibration files, ``evaluate --conformal``, ``diverse.load(...).predict`` /
``predict_set``, ``diverse predict``, the report and ``compare``'s columns."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import diverse
from diverse import metrics
from diverse.app.cli import main
from diverse.app.compare import flat_row, main_column
from diverse.app.config import load_config
from diverse.data.datasets import (
    DataConfig,
    channel_stats,
    denormalize,
    load_dataset,
    validation_split,
)
from diverse.data.ood import ood_group
from diverse.errors import UserError
from diverse.evaluation.posthoc import load_calibration, ood_figures
from diverse.math import calibration, confidence

SMALL = ["--set", "data.name=digits", "--set", 'data.ood=["uniform", "rotated"]',
         "--set", "model.hidden=[32]", "--set", "ensemble.members=3",
         "--set", "train.epochs=2", "--set", "train.lr=0.01", "--set", "train.batch_size=64"]


def _train(tmp_path, name="run", extra=()):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nname = "digits"\n')
    out = tmp_path / name
    assert main(["train", str(cfg), *SMALL, *extra, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("posthoc"), extra=(
        "--set", "data.validation_fraction=0.25"))


def _raw_test(run_dir):
    data = load_dataset(load_config(run_dir / "config.toml").data)
    return data, denormalize(data.x_test, data.mean, data.std).numpy()


# ------------------------------------------------------------------ validation split


def test_validation_split_is_a_disjoint_seeded_part_of_the_training_set():
    x, y = torch.arange(100.0)[:, None], torch.arange(100)
    x_tr, y_tr, x_val, y_val = validation_split(x, y, 0.2, seed=3)
    assert len(y_val) == 20 and len(y_tr) == 80
    assert sorted(torch.cat([y_tr, y_val]).tolist()) == list(range(100))
    assert torch.equal(y_tr, y_tr.sort().values)  # the kept examples keep their order
    assert torch.equal(x_val[:, 0].long(), y_val)
    assert torch.equal(validation_split(x, y, 0.2, seed=3)[3], y_val)
    assert not torch.equal(validation_split(x, y, 0.2, seed=4)[3], y_val)
    assert len(validation_split(x[:3], y[:3], 0.01, seed=0)[3]) == 1  # at least one held out

    full = load_dataset(DataConfig(name="digits", normalize=False))
    cfg = DataConfig(name="digits", normalize=False, validation_fraction=0.2, seed=3)
    split = load_dataset(cfg)
    n = len(full.x_train)
    assert len(split.x_val) == int(np.ceil(0.2 * n)) and len(split.x_train) == n - len(split.x_val)
    assert torch.equal(split.x_test, full.x_test)
    # normalization statistics come from the kept training examples only
    normalized = load_dataset(DataConfig(name="digits", validation_fraction=0.2, seed=3))
    assert normalized.mean == channel_stats(split.x_train)[0]
    torch.testing.assert_close(denormalize(normalized.x_val, normalized.mean, normalized.std),
                               split.x_val, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_validation_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(UserError, match=r"validation_fraction = .*must be in \[0, 1\)"):
        DataConfig(name="digits", validation_fraction=fraction)


# -------------------------------------------------------------------- OOD groups


def test_ood_groups_near_and_far():
    assert ood_group("mnist", "fashion-mnist") == "near"
    assert ood_group("digits", "fashion-mnist") == "near"
    assert ood_group("rotated", "cifar10") == "near"
    assert ood_group("cifar100", "cifar10") == "near"
    assert ood_group("svhn", "cifar10") == "far"
    assert ood_group("uniform", "fashion-mnist") == "far"
    assert ood_group("npz", "npz") == "far"
    assert ood_group("npz", "npz", near=("npz",)) == "near"


def test_ood_figures_mix_the_test_set_with_each_ood_set():
    g = torch.Generator().manual_seed(0)
    logits_in = 4 * torch.randn(4, 300, 5, generator=g, dtype=torch.float64)
    logits_out = torch.randn(4, 200, 5, generator=g, dtype=torch.float64)
    p_in, p_out = logits_in.softmax(-1), logits_out.softmax(-1)
    table = ood_figures(p_in, logits_in, {"far": (p_out, logits_out)})["far"]
    assert set(table) == set(confidence.SCORES)
    s_in = confidence.uncertainty_scores(p_in, logits_in)
    s_out = confidence.uncertainty_scores(p_out, logits_out)
    for score, row in table.items():
        truth = np.r_[np.zeros(300), np.ones(200)]
        scores = np.r_[s_in[score].numpy(), s_out[score].numpy()]
        assert abs(row["auroc"] - roc_auc_score(truth, scores)) < 1e-9
    # without logits on one side, the logit scores are left out
    assert set(ood_figures(p_in, logits_in, {"x": (p_out, None)})["x"]) == \
        set(confidence.SCORES) - set(confidence.LOGIT_SCORES)


# ----------------------------------------------------------- a calibrated run, end to end


def test_calibrated_run_writes_calibration_and_posthoc_figures(calibrated_run):
    figures = json.loads((calibrated_run / "metrics.json").read_text())
    cal = load_calibration(calibrated_run)
    assert cal is not None and cal.validation_examples == figures["n_validation"] == 360
    assert set(cal.scores) == {"lac", "aps", "raps"} and len(cal.scores["aps"]) == 360
    scaling = figures["temperature_scaling"]
    assert set(scaling) == {"pooled", "members"}
    for row in scaling.values():  # fitted on validation: the test NLL moves, accuracy ≈ stays
        assert row["temperature"] > 0 and row["after"]["nll"] < row["before"]["nll"] + 0.05
    conf = figures["conformal"]
    assert conf["alphas"] == [0.05, 0.1, 0.2]
    for score in ("lac", "aps", "raps"):
        sizes = [conf["sets"][score][a]["mean_size"] for a in ("0.05", "0.1", "0.2")]
        assert sizes[0] >= sizes[1] >= sizes[2]  # a smaller α never gives smaller sets
    assert set(figures["ood_scores"]["uniform"]) == set(confidence.SCORES)
    assert figures["ood_groups"] == {"uniform": "far", "rotated": "near"}
    assert set(figures["selective"]) == set(confidence.SCORES)
    history = json.loads((calibrated_run / "checkpoints" / "epoch-0002.json").read_text())
    assert "val_nll" in history["history"][-1] and "test_nll" not in history["history"][-1]
    report = (calibrated_run / "report.md").read_text()
    for section in ("## Temperature scaling", "## Conformal prediction",
                    "## Selective classification", "## Out-of-distribution detection",
                    "plots/reliability_scaling.png", "plots/risk_coverage.png",
                    "plots/conformal_set_sizes.png"):
        assert section in report
    assert (calibrated_run / "data.json").is_file()


def test_load_predicts_raw_inputs_exactly_as_evaluate(calibrated_run, tmp_path, monkeypatch):
    data, raw = _raw_test(calibrated_run)
    monkeypatch.chdir(tmp_path)  # any working directory
    predictor = diverse.load(calibrated_run)
    with np.load(calibrated_run / "predictions.npz") as npz:
        probs, logits = npz["probs"], npz["logits"]
    prediction = predictor.predict(raw)  # NumPy in data units
    assert np.array_equal(prediction.probs.numpy(), probs)
    assert np.array_equal(prediction.logits.numpy(), logits)
    torch.testing.assert_close(prediction.mean, metrics.mean_probs(torch.from_numpy(probs)))
    torch.testing.assert_close(prediction.entropy,
                               metrics.predictive_entropy(torch.from_numpy(probs)))
    # calibrated predictions: the stored temperatures applied to the same logits
    cal = predictor.calibration
    pooled = predictor.predict(torch.from_numpy(raw), calibration="pooled")
    torch.testing.assert_close(pooled.probs, calibration.apply_temperature(
        cal.temperature["pooled"], "pooled", probs=torch.from_numpy(probs)))
    members = predictor.predict(raw, calibration="members")
    assert members.probs.shape == probs.shape
    figures = json.loads((calibrated_run / "metrics.json").read_text())
    assert abs(float(metrics.nll(members.probs, data.y_test))
               - figures["temperature_scaling"]["members"]["after"]["nll"]) < 1e-6


def test_predict_set_reproduces_the_evaluated_coverage(calibrated_run):
    data, raw = _raw_test(calibrated_run)
    predictor = diverse.load(calibrated_run)
    figures = json.loads((calibrated_run / "metrics.json").read_text())
    for score in ("lac", "aps", "raps"):
        sets = predictor.predict_set(raw, 0.1, score)
        assert sets.shape == (len(raw), 10) and sets.dtype == torch.bool
        covered = sets[torch.arange(len(raw)), data.y_test].double().mean()
        row = figures["conformal"]["sets"][score]["0.1"]
        assert float(covered) == pytest.approx(row["coverage"], abs=1e-12)
        assert float(sets.sum(1).double().mean()) == pytest.approx(row["mean_size"], abs=1e-12)
    with pytest.raises(UserError, match="alpha must be a number in"):
        predictor.predict_set(raw, 1.5)
    with pytest.raises(UserError, match="expects \\(N, 1, 8, 8\\).*channels first"):
        predictor.predict(raw.transpose(0, 2, 3, 1))
    bad = raw.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        predictor.predict(bad)


def test_predict_command_writes_predictions_and_sets(calibrated_run, tmp_path, capsys):
    _data, raw = _raw_test(calibrated_run)
    inputs = tmp_path / "x.npz"
    np.savez(inputs, x=raw[:20])
    out = tmp_path / "pred.npz"
    assert main(["predict", str(calibrated_run), str(inputs), "--out", str(out),
                 "--conformal", "0.1", "--score", "raps"]) == 0
    with np.load(out) as pred, np.load(calibrated_run / "predictions.npz") as ref:
        assert np.array_equal(pred["probs"], ref["probs"][:, :20])
        assert pred["sets_0.1"].shape == (20, 10)
        assert set(pred.files) >= {"mean", "entropy", "mutual_information", "logits"}
    assert "20 examples" in capsys.readouterr().out
    np.savez(inputs, a=raw[:2], b=raw[:2])
    assert main(["predict", str(calibrated_run), str(inputs), "--out", str(out)]) == 2
    assert "no array 'x'" in capsys.readouterr().err


def test_evaluate_conformal_prints_coverage(calibrated_run, capsys):
    assert main(["evaluate", str(calibrated_run), "--conformal", "0.1", "--conformal", "0.3",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    figures = json.loads((calibrated_run / "metrics.json").read_text())
    assert figures["conformal"]["alphas"] == [0.05, 0.1, 0.2, 0.3]
    for score in ("lac", "aps", "raps"):
        row = figures["conformal"]["sets"][score]["0.3"]
        assert f"alpha=0.3 {score:>4}: coverage {row['coverage']:.4f}" in out
    assert main(["evaluate", str(calibrated_run), "--conformal", "1.5"]) == 2
    assert "must be in (0, 1)" in capsys.readouterr().err


def test_conformal_without_validation_split_is_refused_and_writes_nothing(tmp_path, capsys):
    run = _train(tmp_path)
    assert not (run / "calibration.json").exists()
    assert "validation_fraction" in (run / "report.md").read_text()
    before = (run / "metrics.json").stat().st_mtime_ns
    assert main(["evaluate", str(run), "--conformal", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "needs a validation split" in err and err.count("\n") == 1
    assert (run / "metrics.json").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="no calibration"):
        diverse.load(run).predict_set(np.zeros((1, 1, 8, 8)), 0.1)


def test_regression_run_scales_std_and_gives_intervals(tmp_path):
    cfg = tmp_path / "r.toml"
    cfg.write_text('[data]\nname = "regression-1d"\nvalidation_fraction = 0.3\n'
                   '[model]\nhidden = [16]\nactivation = "tanh"\n[ensemble]\nmembers = 3\n'
                   '[train]\nepochs = 3\nbatch_size = 32\nlr = 0.01\n'
                   '[likelihood]\nname = "gaussian"\n')
    out = tmp_path / "reg"
    assert main(["train", str(cfg), "--out", str(out), "--quiet"]) == 0
    figures = json.loads((out / "metrics.json").read_text())
    assert figures["std_scaling"]["scale"] > 0
    assert set(figures["conformal"]["intervals"]) == {"0.05", "0.1", "0.2"}
    predictor = diverse.load(out)
    data = load_dataset(load_config(out / "config.toml").data)
    raw = denormalize(data.x_test, data.mean, data.std).numpy()
    lower, upper = predictor.predict_set(raw[:, 0], 0.1)  # (N,) taken as (N, 1)
    covered = ((data.y_test >= lower) & (data.y_test <= upper)).double().mean()
    assert float(covered) == pytest.approx(figures["conformal"]["intervals"]["0.1"]["coverage"],
                                           abs=1e-12)
    scaled = predictor.predict(raw, calibration="std")
    plain = predictor.predict(raw)
    torch.testing.assert_close(scaled.std, figures["std_scaling"]["scale"] * plain.std)
    assert "## Conformal intervals" in (out / "report.md").read_text()


def test_compare_row_has_every_posthoc_figure(calibrated_run):
    row = flat_row(json.loads((calibrated_run / "metrics.json").read_text()))
    for key in ("aurc[msp]", "e_aurc[entropy]", "augrc[energy]", "accuracy_at_90[msp]",
                "temperature[pooled]", "nll[ts_members]", "coverage[aps@0.1]",
                "set_size[raps@0.05]", "worst_class_coverage[lac@0.2]",
                "auroc[uniform/energy]", "auroc[rotated]"):
        assert key in row
    assert main_column("aurc[msp]") and main_column("accuracy") and main_column("auroc[rotated]")
    assert not main_column("aurc[energy]") and not main_column("auroc[uniform/energy]")


def test_raps_settings_are_options_kept_across_evaluations(calibrated_run, capsys):
    assert main(["evaluate", str(calibrated_run), "--raps-lambda", "0.5", "--raps-k-reg", "1",
                 "--quiet"]) == 0
    cal = load_calibration(calibrated_run)
    assert (cal.raps_lambda, cal.raps_k_reg) == (0.5, 1)
    figures = json.loads((calibrated_run / "metrics.json").read_text())
    assert figures["conformal"]["raps_lambda"] == 0.5
    assert main(["evaluate", str(calibrated_run), "--quiet"]) == 0  # kept when not given
    assert load_calibration(calibrated_run).raps_lambda == 0.5
    assert main(["evaluate", str(calibrated_run), "--raps-lambda", "-1"]) == 2
    assert "--raps-lambda -1.0" in capsys.readouterr().err
    assert main(["evaluate", str(calibrated_run), "--raps-lambda", "0.01", "--raps-k-reg", "2",
                 "--quiet"]) == 0
