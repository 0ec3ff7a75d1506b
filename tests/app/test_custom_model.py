"""[model] name = "custom": a user's own nn.Module factory, from the CLI and diverse.load."""

import json

import numpy as np
import pytest

import diverse
from diverse.app.cli import main

MODULE = '''
import torch
from torch import nn


class SmallCNN(nn.Module):
    feature_layers = ("act",)

    def __init__(self, channels, classes):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4 * 8 * 8, classes)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).flatten(1))


def make_cnn(input_shape, num_outputs):
    return SmallCNN(input_shape[0], num_outputs)


def plain(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, num_outputs))


def wrong_width(input_shape, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def not_a_module(input_shape, num_outputs):
    return 42
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my_models.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)  # not the config's folder: the import still finds it
    return folder


def _config(folder, factory, method="de", extra=""):
    path = folder / "c.toml"
    path.write_text(f'[data]\nname = "digits"\ntrain_subset = 300\n[model]\nname = "custom"\n'
                    f'factory = "{factory}"\n[ensemble]\nmembers = 2\n[method]\nname = '
                    f'"{method}"\n{extra}[train]\nepochs = 3\nbatch_size = 64\nlr = 0.01\n')
    return path


def test_a_custom_cnn_trains_evaluates_and_loads(project, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(_config(project, "my_models:make_cnn")), "--out", str(out),
                 "--quiet"]) == 0
    figures = json.loads((out / "metrics.json").read_text())
    assert figures["accuracy"] > 0.3 and "act" in figures["cka"]["layers"]
    assert f'search_path = "{project}"' in (out / "config.toml").read_text()
    with np.load(out / "predictions.npz") as npz:
        probs = npz["probs"]
    from diverse.app.config import load_config
    from diverse.data.datasets import denormalize, load_dataset

    data = load_dataset(load_config(out / "config.toml").data)
    raw = denormalize(data.x_test, data.mean, data.std).numpy()
    assert np.array_equal(diverse.load(out).predict(raw).probs.numpy(), probs)


def test_feature_methods_need_named_layers_on_a_module_without_feature_layers(project, tmp_path,
                                                                               capsys):
    out = tmp_path / "run"
    assert main(["train", str(_config(project, "my_models:plain", "he-cka")), "--out",
                 str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "declares no feature_layers" in err and "from: 0, 1, 2, 3" in err
    assert not out.exists()
    assert main(["train", str(_config(project, "my_models:plain", "he-cka",
                                      'layers = ["2", "output"]\n')),
                 "--out", str(out), "--quiet"]) == 0


@pytest.mark.parametrize(("factory", "message"), [
    ("my_models", "expected \"module:function\""),
    ("no_such_module:make", "cannot import 'no_such_module'"),
    ("my_models:missing", "has no function 'missing'"),
    ("my_models:wrong_width", "to (2, 3); expected (2, 10)"),
    ("my_models:not_a_module", "returned int, not a torch.nn.Module"),
])
def test_bad_factories_are_refused_with_one_line(project, tmp_path, capsys, factory, message):
    out = tmp_path / "run"
    assert main(["train", str(_config(project, factory)), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()
