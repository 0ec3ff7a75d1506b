"""Toy datasets of diverse.data.toys, through the registry and directly."""

from __future__ import annotations

import math

import pytest
import torch

from diverse.data.datasets import DataConfig, load_dataset
from diverse.data.toys import TOYS, blobs, four_quadrants, regression_1d, two_moons


@pytest.mark.parametrize("name", list(TOYS))
def test_toys_deterministic_and_shaped(name):
    a, b, c = (TOYS[name](0, -1.0, s) for s in (3, 3, 4))
    for x, y in ((a.x_train, a.y_train), (a.x_test, a.y_test)):
        assert x.dtype == torch.float32 and x.dim() == 2 and len(y) == len(x)
        if a.task == "classification":
            assert x.shape[1] == 2 and y.dtype == torch.int64 and y.dim() == 1
            assert 0 <= int(y.min()) and int(y.max()) < a.num_outputs
        else:
            assert x.shape[1] == 1 and y.shape == (len(x), 1) and y.dtype == torch.float32
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_train[:10], a.x_test[:10])  # train / test streams differ


def test_regression_1d_gap_and_defaults():
    t = regression_1d(seed=0)
    x = t.x_train.squeeze(1)
    assert len(x) == 90
    in_left, in_right = (x >= 1.5) & (x <= 2.5), (x >= 4.5) & (x <= 6.0)
    assert (in_left | in_right).all()  # the gap (2.5, 4.5) is empty
    assert 20 < int(in_left.sum()) < 55 and 35 < int(in_right.sum()) < 70  # ~36 / 54
    assert torch.equal(t.x_test.squeeze(1), torch.linspace(0, 7, 200))
    assert torch.allclose(t.y_test, t.x_test * torch.sin(t.x_test))  # noiseless test targets
    big = regression_1d(n_train=20000, seed=1)
    resid = big.y_train - big.x_train * torch.sin(big.x_train)
    assert abs(resid.std().item() - 0.25) < 0.01 and abs(resid.mean().item()) < 0.01
    quiet = regression_1d(n_train=50, noise_std=0.0)
    assert torch.allclose(quiet.y_train, quiet.x_train * torch.sin(quiet.x_train), atol=1e-6)


def test_blobs_centers_and_noise():
    t = blobs(n_train=5000, noise_std=0.3, seed=2)
    assert t.num_outputs == 5 and len(t.x_test) == 500
    for k in range(5):
        pts = t.x_train[t.y_train == k]
        angle = 2 * math.pi * k / 5
        center = torch.tensor([2.5 * math.cos(angle), 2.5 * math.sin(angle)])
        assert torch.allclose(pts.mean(0), center, atol=0.05)
        assert torch.allclose(pts.std(0), torch.full((2,), 0.3), atol=0.03)


def test_two_moons_and_quadrants():
    m = two_moons(seed=0, noise_std=0.0)
    assert torch.equal(torch.bincount(m.y_train), torch.tensor([250, 250]))
    outer = m.x_train[m.y_train == 0]
    assert torch.allclose(outer.norm(dim=1), torch.ones(250), atol=1e-5)
    inner = m.x_train[m.y_train == 1] - torch.tensor([1.0, 0.5])
    assert torch.allclose(inner.norm(dim=1), torch.ones(250), atol=1e-5)
    q = four_quadrants(seed=0)
    x, y = q.x_train, q.y_train
    expected = torch.where(x[:, 1] > 0, torch.where(x[:, 0] > 0, 0, 1),
                           torch.where(x[:, 0] > 0, 3, 2))
    assert torch.equal(y, expected) and (x.abs() <= 1).all()


def test_toy_through_load_dataset():
    cfg = DataConfig(name="regression-1d", n_train=30, noise_std=0.1, seed=7)
    d = load_dataset(cfg)
    raw = regression_1d(30, 0.1, 7)
    assert d.task == "regression" and d.num_outputs == 1 and d.input_shape == (1,)
    assert torch.allclose(d.x_train.mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(d.x_train * d.std[0] + d.mean[0], raw.x_train, atol=1e-5)
    assert torch.equal(d.y_train, raw.y_train)  # targets are not normalized
    b = load_dataset(DataConfig(name="blobs", normalize=False, train_subset=100))
    assert b.x_train.shape == (100, 2) and b.mean == (0.0, 0.0)
