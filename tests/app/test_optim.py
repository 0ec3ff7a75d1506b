"""Stacked optimizers equal per-member optimizers; schedules match closed forms."""

import math

import pytest
import torch

from diverse.app.optim import (
    build_optimizer,
    load_optimizer_tensors,
    optimizer_tensors,
    schedule_factor,
)
from diverse.errors import UserError

SETTINGS = [("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
            ("sgd", {"momentum": 0.0}), ("adam", {}), ("adamw", {"weight_decay": 0.1})]


@pytest.mark.parametrize(("name", "kw"), SETTINGS)
def test_stacked_optimizer_equals_independent_member_optimizers(name, kw):
    torch.manual_seed(0)
    M = 3
    stacked = torch.randn(M, 4, requires_grad=True)
    members = [stacked[m].detach().clone().requires_grad_(True) for m in range(M)]
    opt = build_optimizer([stacked], name, 0.1, **kw)
    opts = [build_optimizer([p], name, 0.1, **kw) for p in members]
    for _ in range(5):
        g = torch.randn(M, 4)
        stacked.grad = g.clone()
        opt.step()
        for m in range(M):
            members[m].grad = g[m].clone()
            opts[m].step()
    torch.testing.assert_close(stacked.detach(), torch.stack(members).detach())


def test_optimizer_state_round_trip_continues_identically():
    torch.manual_seed(0)
    p = torch.randn(2, 3, requires_grad=True)
    opt = build_optimizer([p], "adam", 0.01)
    for _ in range(3):
        p.grad = torch.randn(2, 3)
        opt.step()
    tensors = optimizer_tensors(opt, ["w"])
    assert set(tensors) == {"w::step", "w::exp_avg", "w::exp_avg_sq"}
    q = p.detach().clone().requires_grad_(True)
    opt2 = build_optimizer([q], "adam", 0.01)
    load_optimizer_tensors(opt2, ["w"], tensors)
    g = torch.randn(2, 3)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


def test_schedules_closed_forms():
    assert schedule_factor("constant", 0.7) == 1.0
    assert schedule_factor("cosine", 0.0) == 1.0
    assert math.isclose(schedule_factor("cosine", 1.0), 0.01)
    assert math.isclose(schedule_factor("cosine", 0.5, final=0.0), 0.5)
    # FoRDE: constant to 50%, linear to 0.01 at 90%, then flat
    assert schedule_factor("constant-linear", 0.5) == 1.0
    assert math.isclose(schedule_factor("constant-linear", 0.7), 1 + (0.01 - 1) * 0.5)
    assert math.isclose(schedule_factor("constant-linear", 0.95), 0.01)
    with pytest.raises(UserError, match="'step'"):
        schedule_factor("step", 0.1)
    with pytest.raises(UserError, match="'rmsprop'"):
        build_optimizer([torch.zeros(1, requires_grad=True)], "rmsprop", 0.1)
