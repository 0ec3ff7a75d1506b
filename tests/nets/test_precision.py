"""Opt-in bf16 autocast and torch.compile of the member forward."""

import copy

import pytest
import torch
from torch import nn

from diverse.app.config import load_config
from diverse.app.train import build_run, train
from diverse.data.datasets import load_dataset
from diverse.errors import UserError
from diverse.methods.base import Step
from diverse.nets import precision
from diverse.nets.ensemble import Ensemble, flatten_params
from diverse.nets.models import MLPConfig, build_model

BASE = ["data.name=digits", "data.train_subset=64", "data.test_subset=32", "model.name=mlp",
        "model.hidden=[12]", "ensemble.members=3", "ensemble.execution=vmap", "train.epochs=1",
        "train.batch_size=32", "train.lr=0.01", "train.eval_every=0", "train.prior_std=1.0"]


def mlp() -> nn.Module:
    return build_model(MLPConfig(hidden=(16,)), (1, 8, 8), 10)


def test_bf16_forward_is_the_autocast_forward_in_float32_and_survives_copies():
    torch.manual_seed(0)
    module, x = mlp(), torch.randn(20, 1, 8, 8)
    fp32 = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = module(x).float()
    names = [k for k, _ in module.named_parameters()]
    precision.autocast_forward(module, "cpu")
    out = module(x)
    assert out.dtype == torch.float32 and torch.equal(out, reference)
    assert 0 < (out - fp32).abs().max() < 0.05 * fp32.abs().max()  # bf16 rounding, no more
    assert [k for k, _ in module.named_parameters()] == names  # checkpoints keep their names
    assert torch.equal(copy.deepcopy(module)(x), reference)


def test_bf16_ensemble_members_match_standalone_members():
    ens = Ensemble(mlp, 3, seed=1, execution="vmap")
    precision.configure(ens, "bf16", compile=False)
    x = torch.randn(20, 1, 8, 8)
    out = ens(x)
    for m in range(3):
        torch.testing.assert_close(out[m], ens.member(m)(x), atol=1e-2, rtol=1e-2)
    plain = Ensemble(mlp, 3, seed=1, execution="vmap")
    assert not torch.equal(out, plain(x))  # the bf16 path is really taken
    torch.testing.assert_close(out, plain(x), atol=0.05, rtol=0.05)


def test_bf16_run_gradients_track_fp32():
    data = load_dataset(load_config(None, BASE).data)
    x, y = data.x_train[:32], data.y_train[:32]
    grads = {}
    for prec in ("fp32", "bf16"):
        run = build_run(load_config(None, [*BASE, f"train.precision={prec}"]), data)
        step = Step(run.ensemble.train(), x, y, run.likelihood, 64, 1.0, 0.0)
        grads[prec] = flatten_params(run.update(step).grads)
    rel = (grads["bf16"] - grads["fp32"]).norm(dim=1) / grads["fp32"].norm(dim=1)
    assert grads["bf16"].dtype == torch.float32
    assert (rel > 0).all() and (rel < 0.05).all()  # bf16 rounding (2^-8), nothing more


def test_compiled_deep_ensemble_equals_eager(tmp_path, monkeypatch):
    graphs = []

    def backend(gm, example_inputs):  # dynamo traces; the graph runs eagerly
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(precision, "COMPILE_BACKEND", backend)
    data = load_dataset(load_config(None, BASE).data)
    states = {}
    for flag in ("false", "true"):
        run = build_run(load_config(None, [*BASE, f"train.compile={flag}"]), data)
        train(run, tmp_path / flag, show_progress=False)
        states[flag] = {k: v.detach() for k, v in run.ensemble.params.items()}
    assert graphs  # the vmapped forward went through torch.compile
    for k, v in states["false"].items():
        assert (states["true"][k] - v).abs().max() <= 1e-6, k


def test_forde_falls_back_to_eager_with_one_notice(tmp_path, monkeypatch, capsys):
    graphs = []
    monkeypatch.setattr(precision, "COMPILE_BACKEND", lambda gm, inputs: graphs.append(gm))
    data = load_dataset(load_config(None, BASE).data)
    states = {}
    for flag in ("false", "true"):
        run = build_run(load_config(None, [*BASE, "method.name=forde", f"train.compile={flag}"]),
                        data)
        train(run, tmp_path / flag, show_progress=False)
        states[flag] = run.ensemble.params
    assert capsys.readouterr().err.count("forde differentiates through input gradients") == 1
    assert graphs == []  # nothing was compiled
    for k, v in states["false"].items():
        assert torch.equal(states["true"][k], v), k


def test_bad_precision_and_compile_settings_are_refused():
    with pytest.raises(UserError, match=r"\[train\] precision = 'fp16': allowed fp32, bf16"):
        load_config(None, [*BASE, "train.precision=fp16"])
    data = load_dataset(load_config(None, BASE).data)
    with pytest.raises(UserError, match="compile = true compiles the vmap execution"):
        build_run(load_config(None, [*BASE, "train.compile=true", "ensemble.execution=loop"]),
                  data)
