"""The command line and the run directory it writes."""

import base64
import json
import re
import tomllib

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diverse import metrics
from diverse.app.cli import main

SMALL = ["--set", "data.name=digits", "--set", "data.train_subset=400",
         "--set", 'data.ood=["uniform", "rotated"]', "--set", "model.hidden=[32]",
         "--set", "ensemble.members=3", "--set", "train.epochs=2", "--set", "train.lr=0.01",
         "--set", "train.batch_size=32"]


def test_help_lists_datasets_models_and_methods(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ("fashion-mnist", "cifar10", "svhn", "npz", "regression-1d", "two-moons",
                 "mlp", "lenet5", "resnet20", "resnet56", "preact-resnet18", "de"):
        assert name in out


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "train.bogus=1"], "unknown key [train] 'bogus'"),
    (["--set", "nosuch.key=1"], "unknown section [nosuch]"),
    (["--set", "train.epochs=many"], "[train] epochs = 'many': expected an integer"),
    (["--set", "ensemble.members=0"], "[ensemble] members = 0: must be an integer >= 1"),
    (["--set", "data.name=imagenet"], "[data] name = 'imagenet': allowed"),
    (["--set", "model.name=vit"], "unknown model 'vit'; allowed:"),
    (["--set", "method.name=magic"], "unknown method 'magic'; allowed: de, f-svgd"),
    (["--set", "data.name=fashion-mnist", "--set", "data.path=EMPTY"], "apt-get install"),
    (["--set", "likelihood.name=gaussian"], "does not fit the classification data"),
])
def test_bad_input_exits_2_with_one_line_and_no_run_dir(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nname = "digits"\n')
    args = [a.replace("EMPTY", str(tmp_path / "empty")) for a in args]
    out = tmp_path / "run"
    assert main(["train", str(cfg), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("diverse: error:") and err.count("\n") == 1
    assert not out.exists()


def test_missing_config_and_not_a_run_dir(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.toml")]) == 2
    assert main(["evaluate", str(tmp_path)]) == 2
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_writes_the_run_directory(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    run = tmp_path / "run"
    assert main(["train", str(cfg), *SMALL, "--out", str(run), "--quiet"]) == 0
    # resolved config: every section, readable back
    resolved = tomllib.loads((run / "config.toml").read_text())
    assert resolved["ensemble"]["members"] == 3 and resolved["train"]["lr"] == 0.01
    assert set(resolved) == {"data", "model", "ensemble", "method", "train", "likelihood",
                             "logging"}
    figures = json.loads((run / "metrics.json").read_text())
    with np.load(run / "predictions.npz", allow_pickle=False) as npz:
        probs, labels = npz["probs"], npz["labels"]
        ood_probs = npz["ood_probs_uniform"]
    assert probs.shape == (3, 360, 10) and labels.shape == (360,)
    # metrics.json agrees with a recomputation from predictions.npz
    p, y = torch.from_numpy(probs), torch.from_numpy(labels)
    assert figures["accuracy"] == pytest.approx(float(metrics.accuracy(p, y)), abs=1e-9)
    assert figures["nll"] == pytest.approx(float(metrics.nll(p, y)), abs=1e-6)
    assert figures["ece"] == pytest.approx(float(metrics.ece(p, y)), abs=1e-6)
    assert figures["brier"] == pytest.approx(float(metrics.brier(p, y)), abs=1e-6)
    assert figures["accuracy"] > 0.8
    assert set(figures["ood"]) == {"uniform", "rotated"}
    auroc = metrics.ood_metrics(p, torch.from_numpy(ood_probs))["auroc"]
    assert figures["ood"]["uniform"]["auroc"] == pytest.approx(auroc, abs=1e-9)
    assert set(figures["ood"]["uniform"]) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    # checkpoint: stacked tensors under module names + manifest
    latest = json.loads((run / "checkpoints/latest.json").read_text())
    manifest = json.loads((run / "checkpoints" / latest["manifest"]).read_text())
    assert manifest["epoch"] == 2 and manifest["versions"]["torch"].startswith("2.13")
    assert manifest["config"]["ensemble"]["members"] == 3
    with safe_open(run / "checkpoints" / manifest["files"]["model"]["name"], "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert shapes and all(s[0] == 3 for s in shapes.values())
    # report with its plots
    report = (run / "report.md").read_text()
    for png in ("training_curves", "reliability", "entropy_ood", "ensemble_size"):
        assert f"plots/{png}.png" in report
        assert (run / "plots" / f"{png}.png").stat().st_size > 5000
    # the offline HTML report: every image inlined as a PNG, nothing fetched from a network
    page = (run / "report.html").read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', page)
    assert len(images) == report.count("![")
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert "http://" not in page and "https://" not in page and "<table>" in page
    # evaluate with another OOD set, then report again
    assert main(["evaluate", str(run), "--ood", "gaussian", "--quiet"]) == 0
    figures = json.loads((run / "metrics.json").read_text())
    assert set(figures["ood"]) == {"gaussian"}
    assert main(["report", str(run)]) == 0
    # shift protocols: 16 corruptions x 5 severities and rotations on 60 test images
    assert main(["evaluate", str(run), "--shift", "--shift-examples", "60", "--quiet"]) == 0
    figures = json.loads((run / "metrics.json").read_text())
    corr, rot = figures["corruptions"], figures["rotations"]
    assert len(corr) == 17 and set(corr["mean"]) == {"1", "2", "3", "4", "5"}
    clean = float(metrics.accuracy(p[:, :60], y[:60]))
    assert rot["angles"][0] == 0.0 and rot["accuracy"][0] == pytest.approx(clean, abs=1e-9)
    mean_acc = [corr["mean"][s]["accuracy"] for s in "12345"]
    assert mean_acc[4] < mean_acc[0] <= clean + 0.05
    assert (run / "plots" / "shift.png").exists()
    assert "corruption_examples.png" in (run / "report.md").read_text()
    # a second train into the same folder is refused
    assert main(["train", str(cfg), *SMALL, "--out", str(run)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_regression_run(tmp_path):
    run = tmp_path / "reg"
    args = ["train", "examples/regression_1d_de.toml", "--set", "train.steps=30",
            "--set", "train.checkpoint_every=10", "--set", "ensemble.members=4",
            "--out", str(run), "--quiet"]
    assert main(args) == 0
    figures = json.loads((run / "metrics.json").read_text())
    assert {"rmse", "nll", "calibration_error", "mean_std"} <= set(figures)
    with np.load(run / "predictions.npz", allow_pickle=False) as npz:
        assert npz["means"].shape == (4, 200, 1) and npz["stds"].shape == (4, 200, 1)
        x = npz["inputs"][:, 0]
        assert x.min() == pytest.approx(0.0, abs=1e-5) and x.max() == pytest.approx(7.0, abs=1e-5)
    assert (run / "plots" / "regression.png").exists()


def test_ensemble_size_curve_ends_at_the_full_ensemble_and_starts_at_member_one():
    from diverse.evaluation.evaluate import ensemble_size_curve

    torch.manual_seed(0)
    probs = torch.randn(4, 50, 3).softmax(-1)
    out = torch.randn(4, 20, 3).mul(0.1).softmax(-1)
    labels = torch.randint(0, 3, (50,))
    curve = ensemble_size_curve(probs, labels, {"noise": out})
    assert curve["members"] == [1, 2, 3, 4]
    assert curve["accuracy"][-1] == pytest.approx(float(metrics.accuracy(probs, labels)))
    assert curve["nll"][0] == pytest.approx(float(metrics.nll(probs[:1], labels)))
    assert curve["ece"][1] == pytest.approx(float(metrics.ece(probs[:2], labels)))
    assert curve["auroc_noise"][-1] == pytest.approx(metrics.ood_metrics(probs, out)["auroc"])


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from diverse.checkpoint import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_train_under_torchrun_points_to_the_launcher(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "examples/regression_1d_de.toml", "--out", str(tmp_path / "r")]) == 2
    assert "diverse.app.launch" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
