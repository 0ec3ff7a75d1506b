"""OOD sets of diverse.data.ood."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diverse.data.datasets import DataConfig, load_dataset
from diverse.data.ood import DEFAULT_OOD, OOD_NAMES, build_ood, digits_images, resize_images
from diverse.errors import UserError


def _no_load(name: str) -> torch.Tensor:
    raise AssertionError(f"should not load {name}")


def _build(name, x, seed=0, dataset="fashion-mnist"):
    return build_ood(name, dataset, x, seed, _no_load)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("name", ["digits", "uniform", "gaussian", "rotated", "flipped"])
def test_shapes_and_range(shape, name):
    x = torch.rand(12, *shape)
    o = _build(name, x)
    assert o.dtype == torch.float32 and o.shape[1:] == shape
    assert len(o) == {"digits": 1797}.get(name, 12)
    assert o.min() >= 0 and o.max() <= 1


def test_noise_seeding_and_distribution():
    x = torch.rand(20000, 1, 4, 4)
    u0, u0b, u1 = (_build("uniform", x, s) for s in (0, 0, 1))
    assert len(u0) == 10000  # min(len(test), 10000)
    assert torch.equal(u0, u0b) and not torch.equal(u0, u1)
    assert abs(u0.mean().item() - 0.5) < 0.01 and abs(u0.var().item() - 1 / 12) < 0.005
    g = _build("gaussian", x, 0)
    assert not torch.equal(g, u0) and torch.equal(g, _build("gaussian", x, 0))
    assert abs(g.mean().item() - 0.5) < 0.01 and abs(g.std().item() - 0.24) < 0.01
    assert g.min() == 0.0 and g.max() == 1.0  # clipped tails


def test_rotated_and_flipped_values():
    x = torch.rand(3, 2, 5, 5)
    r, f = _build("rotated", x), _build("flipped", x)
    assert torch.equal(r, torch.rot90(x, 1, dims=(2, 3)))
    assert torch.equal(r[:, :, 3, 2], x[:, :, 2, 1])  # rot90 CCW: out[i, j] = in[j, W-1-i]
    assert torch.equal(f[:, :, 0], x[:, :, -1]) and torch.equal(f[:, :, 1, 3], x[:, :, 3, 3])
    assert _build("rotated", torch.rand(2, 1, 4, 6)).shape == (2, 1, 4, 6)  # resized back


def test_digits_resized():
    o = _build("digits", torch.rand(2, 3, 28, 28))
    src = digits_images()
    assert src.shape == (1797, 1, 8, 8) and src.max() == 1.0
    assert torch.equal(o[:, 0], o[:, 1]) and torch.equal(o[:, 0], o[:, 2])
    assert abs(o.mean().item() - src.mean().item()) < 0.02  # resizing keeps brightness


def test_resize_images_channels():
    rgb = torch.stack([torch.full((2, 2), 1.0), torch.zeros(2, 2), torch.zeros(2, 2)])[None]
    gray = resize_images(rgb, (1, 2, 2))
    assert torch.allclose(gray, torch.full((1, 1, 2, 2), 0.299))
    with pytest.raises(UserError, match="cannot convert 2-channel"):
        resize_images(torch.rand(1, 2, 4, 4), (3, 4, 4))


def test_npz_ood(tmp_path):
    x_ood = np.random.default_rng(0).random((4, 1, 28, 28))
    np.savez(tmp_path / "o.npz", x_ood=x_ood)
    o = _build(f"npz:{tmp_path / 'o.npz'}", torch.rand(3, 1, 28, 28))
    assert torch.equal(o, torch.from_numpy(x_ood).float())
    with pytest.raises(UserError, match=r"has input shape \(1, 28, 28\), expected \(5,\)"):
        _build(f"npz:{tmp_path / 'o.npz'}", torch.rand(3, 5))
    np.savez(tmp_path / "p.npz", x=x_ood)
    with pytest.raises(UserError, match="no array 'x_ood'"):
        _build(f"npz:{tmp_path / 'p.npz'}", torch.rand(3, 1, 28, 28))
    with pytest.raises(UserError, match="cannot read OOD file"):
        _build(f"npz:{tmp_path / 'missing.npz'}", torch.rand(3, 1, 28, 28))


def test_errors():
    with pytest.raises(UserError, match="unknown OOD set 'noise'; allowed: digits, mnist"):
        _build("noise", torch.rand(2, 1, 8, 8))
    with pytest.raises(UserError, match="is the in-distribution dataset"):
        _build("fashion-mnist", torch.rand(2, 1, 8, 8))
    with pytest.raises(UserError, match="needs image inputs"):
        _build("rotated", torch.rand(2, 2), dataset="blobs")
    assert _build("uniform", torch.rand(7, 2), dataset="blobs").shape == (7, 2)


def test_defaults_need_no_files():
    needs_files = {"mnist", "fashion-mnist", "svhn", "cifar10", "cifar100"}
    assert set(OOD_NAMES) >= needs_files
    for names in DEFAULT_OOD.values():
        assert set(names) <= set(OOD_NAMES) - needs_files
    d = load_dataset(DataConfig(name="digits", ood=("default", "", "uniform")))
    assert list(d.ood) == list(DEFAULT_OOD["digits"])
    assert all(v.shape[1:] == d.input_shape for v in d.ood.values())
    # OOD sets get the training normalization: uniform noise has mean (0.5 - m) / s
    assert abs(d.ood["uniform"].mean().item() - (0.5 - d.mean[0]) / d.std[0]) < 0.02


def test_synthetic_outliers_set_is_seeded_and_in_range():
    x = torch.rand(50, 1, 28, 28)
    a = build_ood("synthetic", "fashion-mnist", x, 3, lambda name: x)
    b = build_ood("synthetic", "fashion-mnist", x, 3, lambda name: x)
    c = build_ood("synthetic", "fashion-mnist", x, 4, lambda name: x)
    assert a.shape == (50, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
