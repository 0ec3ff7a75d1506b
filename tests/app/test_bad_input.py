"""Bad input found by trying diverse as a new user: one line, exit 2, nothing left behind."""

import numpy as np
import pytest

from diverse.app.cli import main


def _npz(tmp_path, **arrays):
    rng = np.random.default_rng(0)
    base = {"x_train": rng.random((40, 3)).astype(np.float32),
            "y_train": np.arange(40) % 3,
            "x_test": rng.random((12, 3)).astype(np.float32),
            "y_test": np.arange(12) % 3}
    base.update(arrays)
    path = tmp_path / "data.npz"
    np.savez(path, **base)
    return path


def _train(tmp_path, path, *extra):
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\nname = "npz"\npath = "{path}"\n[model]\nhidden = [8]\n'
                      '[ensemble]\nmembers = 2\n[train]\nepochs = 1\nbatch_size = 16\n')
    out = tmp_path / "run"
    code = main(["train", str(config), *extra, "--out", str(out), "--quiet"])
    return code, out


@pytest.mark.parametrize(("arrays", "message"), [
    ({"y_train": np.arange(40) % 3 + 1, "y_test": np.arange(12) % 3 + 1},
     "no example of class 0 (1-based labels? subtract 1)"),
    ({"y_train": np.where(np.arange(40) % 3 == 1, 3, np.arange(40) % 3),
      "y_test": np.arange(12) % 2 * 2}, "no example of class 1"),
    ({"y_test": np.arange(12) % 4}, "y_test has classes [3] that y_train does not have"),
    ({"y_train": (np.arange(40) % 2).astype(np.float32),
      "y_test": (np.arange(12) % 2).astype(np.float32)}, "hold only whole numbers (0, 1)"),
    ({"x_test": np.full((12, 3), np.nan, dtype=np.float32)}, "x_test has 36 NaN or inf"),
    ({"x_train": np.where(np.eye(40, 3) > 0, np.inf, 0.5).astype(np.float32)},
     "x_train has 3 NaN or inf"),
    ({"x_ood": np.full((5, 3), np.inf, dtype=np.float32)}, "OOD set 'npz' has 15 NaN or inf"),
    ({"x_train": np.zeros((40, 8, 8, 3), np.float32), "x_test": np.zeros((12, 8, 8, 3),
                                                                         np.float32)},
     "looks channels-last (N, H, W, C)"),
])
def test_bad_data_is_refused_before_training(tmp_path, capsys, arrays, message):
    code, out = _train(tmp_path, _npz(tmp_path, **arrays))
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_float_whole_number_labels_train_when_the_task_is_named(tmp_path):
    path = _npz(tmp_path, y_train=(np.arange(40) % 3).astype(np.float32),
                y_test=(np.arange(12) % 3).astype(np.float32))
    code, out = _train(tmp_path, path, "--set", "data.task=classification")
    assert code == 0 and (out / "metrics.json").is_file()
    (tmp_path / "regression").mkdir()
    code, _ = _train(tmp_path / "regression", path, "--set", "data.task=regression",
                     "--set", "likelihood.name=gaussian")
    assert code == 0


@pytest.mark.parametrize(("setting", "message"), [
    ("train.lr=inf", "[train] lr = inf: must be a finite number"),
    ("train.lr=nan", "[train] lr = nan: must be a finite number"),
    ("train.momentum=-inf", "[train] momentum = -inf"),
    ("data.task=images", "[data] task = 'images': allowed auto, classification, regression"),
    ("ensemble.members=100000000000", "more than this machine's"),
])
def test_bad_settings_are_refused_with_one_line(tmp_path, capsys, setting, message):
    code, out = _train(tmp_path, _npz(tmp_path), "--set", setting)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_divergence_in_the_first_epoch_names_no_checkpoint_and_leaves_nothing(tmp_path, capsys):
    code, out = _train(tmp_path, _npz(tmp_path), "--set", "train.lr=1e30",
                       "--set", "train.optimizer=sgd")
    err = capsys.readouterr().err
    assert code == 1 and "no checkpoint was written yet" in err
    assert not out.exists()
    code, _ = _train(tmp_path, _npz(tmp_path))  # the same --out works again
    assert code == 0


def test_evaluate_with_ood_keeps_the_npz_sets_own_ood(tmp_path):
    import json

    path = _npz(tmp_path, x_ood=np.random.default_rng(1).random((6, 3)).astype(np.float32) + 3)
    code, out = _train(tmp_path, path)
    assert code == 0
    assert main(["evaluate", str(out), "--ood", "uniform", "--quiet"]) == 0
    figures = json.loads((out / "metrics.json").read_text())
    assert set(figures["ood"]) == {"uniform", "npz"}


def test_relative_data_paths_are_resolved_against_the_config_file(tmp_path, monkeypatch):
    from diverse.app.config import load_config

    folder = tmp_path / "project"
    folder.mkdir()
    data = _npz(folder, x_ood=np.zeros((4, 3), np.float32))
    (folder / "c.toml").write_text('[data]\nname = "npz"\npath = "data.npz"\n'
                                   'ood = ["npz:data.npz", "uniform"]\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(folder / "c.toml")
    assert cfg.data.path == str(data) and cfg.data.ood == (f"npz:{data}", "uniform")
    # --set paths are relative to the working directory
    (elsewhere / "other.npz").write_bytes(data.read_bytes())
    cfg = load_config(folder / "c.toml", ["data.path=other.npz"])
    assert cfg.data.path == str(elsewhere / "other.npz")
    assert main(["train", str(folder / "c.toml"), "--set", "model.hidden=[4]",
                 "--set", "train.epochs=1", "--set", "ensemble.members=2", "--out", "run",
                 "--quiet"]) == 0
    assert f'path = "{data}"' in (elsewhere / "run" / "config.toml").read_text()
