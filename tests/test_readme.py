"""The README's Python examples run as written (against a small trained run)."""

import re
from pathlib import Path

import torch

from diverse.app.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    blocks = _python_blocks()
    assert len(blocks) >= 2 and any("diverse.load" in b for b in blocks)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the run the load example names: Fashion-MNIST (installed by scripts/setup.sh), small
    config = tmp_path / "c.toml"
    config.write_text('[data]\nname = "fashion-mnist"\ntrain_subset = 600\ntest_subset = 200\n'
                      'validation_fraction = 0.25\n[model]\nhidden = [32]\n[ensemble]\n'
                      'members = 2\n[train]\nepochs = 1\nbatch_size = 64\n')
    assert main(["train", str(config), "--out", "runs/fmnist-cal", "--quiet"]) == 0
    spaces = []
    for block in _python_blocks():
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
        spaces.append(namespace)
    # the Library walk-through: trained, checkpointed, loaded, predicting as in process
    from diverse.app.train import predict_trained
    from diverse.math import metrics
    from diverse.nets.likelihoods import Categorical

    walk = next(ns for ns in spaces if "make_net" in ns)
    assert walk["probs"].shape == (5, 297, 10)
    assert float(metrics.accuracy(walk["probs"], walk["y"][1500:])) > 0.85
    here = predict_trained(walk["method"], Categorical(), walk["members"], None,
                           walk["x"][1500:])["probs"]
    assert torch.equal(walk["probs"], here)
    # the load example's results: the stored temperature applied to the same predictions
    from diverse.math.calibration import apply_temperature

    run, pred = namespace["run"], namespace["pred"]
    expected = apply_temperature(run.calibration.temperature["pooled"], "pooled",
                                 probs=pred.probs)
    torch.testing.assert_close(namespace["calibrated"].probs, expected)
    assert namespace["sets"].shape == (16, 10) and namespace["sets"].dtype == torch.bool
