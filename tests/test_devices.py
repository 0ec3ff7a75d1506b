"""The device-relevant paths on every device this machine has: the CPU always, CUDA where
present (``pytest -m cuda tests/test_devices.py`` runs only the CUDA cases, as
``benchmarks/gpu_all.sh`` does on a lent GPU).

vmap = loop for the interacting methods, exact resume of a run cut mid-epoch, a bf16
step, and the divergence stop of the accelerator path (checks kept on the device).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import diverse
from callbacks import Interrupt
from diverse.app.loop import TensorBatches
from diverse.errors import DivergenceError
from diverse.methods.base import Step
from diverse.nets.likelihoods import Categorical

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ON = [pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in DEVICES]
N, CLASSES = 64, 3


@pytest.fixture(autouse=True)
def _exact_matmuls():
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def data(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % CLASSES
    x = torch.randn(N, 1, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float() - 1.0
    return x.to(device), y.to(device)


def net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, CLASSES))


METHODS = {
    "de": diverse.DeepEnsembleConfig(),
    "svgd": diverse.SVGDConfig(repulsion_scale="batch"),
    "wgd-ssge": diverse.WGDConfig(estimator="ssge", repulsion_scale="batch"),
    "f-wgd": diverse.WGDConfig(name="f-wgd"),
    "forde": diverse.FoRDEConfig(diagnostics_every=1),
}


@pytest.mark.parametrize("device", ON)
@pytest.mark.parametrize("name", list(METHODS))
def test_vmap_equals_loop(device, name):
    x, y = data(device)
    method = diverse.build_method(METHODS[name], diverse.TrainingData(inputs=x.cpu(),
                                                                      targets=y.cpu()))
    grads = []
    for execution in ("vmap", "loop"):
        ens = method.ensemble(net, 4, seed=1, execution=execution, device=device).train()
        torch.manual_seed(2)
        result = method.update(Step(ens, x[:16], y[:16], Categorical(), N, 1.0, 0.3, 5))
        grads.append({k: g.double().cpu() for k, g in result.grads.items()})
    for key, want in grads[1].items():
        scale = max(want.abs().max().item(), 1e-6)
        torch.testing.assert_close(grads[0][key] / scale, want / scale, atol=2e-5, rtol=1e-4)


def _run(device: str, name: str, run_dir, **kwargs):
    x, y = data(device)
    method = diverse.build_method(METHODS[name], diverse.TrainingData(inputs=x.cpu(),
                                                                      targets=y.cpu()))
    ensemble = method.ensemble(net, 3, seed=4, device=device)
    train = diverse.TrainConfig(epochs=3, lr=0.02, prior_std=1.0, seed=6, device=device,
                                checkpoint_every_steps=3)
    return ensemble, diverse.fit(ensemble, method, TensorBatches(x, y, 16), n_train=N,
                                 train=train, run_dir=run_dir, show_progress=False, **kwargs)


@pytest.mark.parametrize("device", ON)
@pytest.mark.parametrize("name", ["de", "svgd", "f-wgd"])
def test_a_run_cut_mid_epoch_resumes_exactly(device, name, tmp_path):
    full, full_result = _run(device, name, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        _run(device, name, tmp_path / "cut", callbacks=[Interrupt(7)])
    latest = json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())
    assert latest["manifest"] == "epoch-0001-step-00000006.json"  # mid epoch 2
    resumed, resumed_result = _run(device, name, tmp_path / "cut", resume=True)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert [r["train_loss"] for r in full_result.history] == \
        [r["train_loss"] for r in resumed_result.history]


@pytest.mark.parametrize("device", ON)
def test_a_bf16_step_trains(device):
    x, y = data(device)
    method = diverse.build_method(diverse.SVGDConfig(repulsion_scale="batch"))
    ensemble = method.ensemble(net, 3, seed=4, execution="vmap", device=device)
    train = diverse.TrainConfig(epochs=4, lr=0.02, seed=6, device=device, precision="bf16")
    history = diverse.fit(ensemble, method, TensorBatches(x, y, 16), n_train=N, train=train,
                          show_progress=False).history
    assert all(torch.isfinite(p).all() for p in ensemble.params.values())
    assert history[-1]["train_accuracy"] > 0.8


@pytest.mark.parametrize("device", ON)
def test_the_divergence_stop_names_the_step(device, tmp_path):
    x, y = data(device)
    method = diverse.build_method(diverse.DeepEnsembleConfig())
    ensemble = method.ensemble(net, 2, seed=4, device=device)
    update, calls = method.update, {"n": 0}

    def poisoned(step):
        calls["n"] += 1
        result = update(step)
        if calls["n"] == 6:  # epoch 2 (4 steps an epoch), step 2
            result.loss[0] = float("nan")
        return result

    method.update = poisoned
    train = diverse.TrainConfig(epochs=3, lr=0.02, seed=6, device=device)
    with pytest.raises(DivergenceError, match=r"epoch 2 step 2 \(global step 6\)"):
        diverse.fit(ensemble, method, TensorBatches(x, y, 16), n_train=N, train=train,
                    run_dir=tmp_path, show_progress=False)
