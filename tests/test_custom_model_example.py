"""``examples/custom_model.py`` on a small subset: a user CNN and an augmented
DataLoader through the public API, as DE, SVGD, f-WGD, FoRDE, HE-CKA with outliers,
SWAG and Laplace; each killed mid-epoch and resumed to bit-identical parameters,
and each loaded back to predict exactly as in process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diverse.app.loop import Callback

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_model.py"


def example():
    spec = importlib.util.spec_from_file_location("custom_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = {"subset": 160, "epochs": 2, "members": 2, "show_progress": False}


def test_the_example_runs_and_loaded_runs_predict_exactly(tmp_path):
    # as a user runs it: a script, whose factory diverse.load re-imports from its file
    done = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(tmp_path), "--subset",
                           "160", "--epochs", "2", "--members", "2"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]  # main compares load().predict exactly
    table = done.stdout
    assert "every loaded run predicted exactly as in process" in table
    for name in example().method_configs():
        assert f"| {name} |" in table
        assert json.loads((tmp_path / name / "model.json").read_text())["factory"] == \
            "custom_model:make_cnn"


class Kill(Callback):
    def on_step(self, step, result):
        if step == 5:  # 3 steps per epoch: in epoch 2, after its step-4 checkpoint
            raise KeyboardInterrupt


@pytest.mark.parametrize("name", ["de", "svgd", "f-wgd", "forde", "he-cka", "swag", "laplace"])
def test_each_method_killed_mid_epoch_resumes_to_identical_parameters(name, tmp_path):
    ex = example()
    _m, full, full_result, _v, _t = ex.train_method(name, tmp_path / "full",
                                                    checkpoint_every_steps=1, **SMALL)
    with pytest.raises(KeyboardInterrupt):
        ex.train_method(name, tmp_path / "cut", checkpoint_every_steps=1, callbacks=(Kill(),),
                        **SMALL)
    latest = json.loads((tmp_path / "cut" / name / "checkpoints" / "latest.json").read_text())
    assert latest["manifest"] == "epoch-0001-step-00000004.json"
    _m, resumed, resumed_result, _v, _t = ex.train_method(
        name, tmp_path / "cut", checkpoint_every_steps=1, resume=True, **SMALL)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    if full_result.samples is not None:
        for key, value in full_result.samples.params.items():
            assert torch.equal(value, resumed_result.samples.params[key]), key
