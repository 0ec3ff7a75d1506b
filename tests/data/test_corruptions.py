"""Corruptions and rotations of diverse.data.corruptions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diverse.data.corruptions import (
    CORRUPTIONS,
    RANDOM_CORRUPTIONS,
    SEVERITIES,
    corrupt,
    rotate,
    rotated_sets,
)
from diverse.errors import UserError

SHAPES = [(4, 1, 28, 28), (4, 3, 32, 32)]


def _smooth(shape: tuple[int, ...], seed: int = 0, coarse: int = 6) -> torch.Tensor:
    """(N, C, H, W) low-pass random images in [0, 1]: bilinear upsampled coarse noise."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.rand(n, c, coarse, coarse, generator=g)
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def test_at_least_15_registered():
    assert len(CORRUPTIONS) >= 15
    assert set(RANDOM_CORRUPTIONS) <= set(CORRUPTIONS)


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_dtype_range_finite(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    for name in CORRUPTIONS:
        for s in SEVERITIES:
            y = corrupt(x, name, s, seed=3)
            assert y.shape == x.shape and y.dtype == torch.float32, (name, s)
            assert torch.isfinite(y).all(), (name, s)
            assert y.min() >= 0 and y.max() <= 1, (name, s)
            assert not torch.equal(y, x), (name, s)  # every type changes the image


@pytest.mark.parametrize("shape", SHAPES)
def test_deterministic_under_seed(shape):
    x = _smooth(shape)
    state = torch.random.get_rng_state()
    for name in CORRUPTIONS:
        a, b = corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=7)
        assert torch.equal(a, b), name
        c = corrupt(x, name, 3, seed=8)
        if name in RANDOM_CORRUPTIONS:
            assert not torch.equal(a, c), name
        else:  # deterministic types ignore the seed
            assert torch.equal(a, c), name
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched


@pytest.mark.parametrize("shape", SHAPES)
def test_strength_increases_with_severity(shape):
    # Strictly increasing mean |corrupted - clean| for every type: no exceptions are
    # needed (pixelate uses integer cells, saturate is defined for grayscale too).
    x = _smooth((8, *shape[1:]), seed=1)
    for name in CORRUPTIONS:
        d = [(corrupt(x, name, s, seed=0) - x).abs().mean().item() for s in SEVERITIES]
        assert all(b > a for a, b in zip(d, d[1:], strict=False)), (name, d)
        assert d[0] > 1e-3, (name, d)


def test_noise_magnitudes():
    x = torch.full((2, 1, 28, 28), 0.5)
    z = corrupt(x, "gaussian_noise", 5, seed=0) - x
    assert abs(z.std().item() - 0.10) < 0.01
    hit = corrupt(x, "impulse_noise", 5, seed=0) != x
    assert abs(hit.float().mean().item() - 0.07) < 0.015
    assert torch.allclose(corrupt(x, "brightness", 5), torch.full_like(x, 0.8))
    assert torch.allclose(corrupt(x, "contrast", 1), x)  # constant image: no contrast


def test_blurs_preserve_constant_images():
    x = torch.full((2, 3, 32, 32), 0.3)
    for name in ("gaussian_blur", "defocus_blur", "motion_blur", "zoom_blur", "pixelate"):
        assert torch.allclose(corrupt(x, name, 5), x, atol=1e-6), name
    assert torch.allclose(corrupt(x, "jpeg_like", 5), x, atol=2 / 255)
    assert torch.allclose(corrupt(x, "saturate", 5), x, atol=1e-6)  # gray RGB: no chroma


def test_bad_name_and_severity():
    x = torch.rand(1, 1, 28, 28)
    with pytest.raises(UserError, match="allowed: gaussian_noise, shot_noise"):
        corrupt(x, "blurr", 1)
    for s in (0, 6):
        with pytest.raises(UserError, match=r"severity must be one of \[1, 2, 3, 4, 5\]"):
            corrupt(x, "fog", s)
    with pytest.raises(UserError, match=r"severity must be one of \[1, 2, 3, 4, 5\]"):
        CORRUPTIONS["fog"](x, 0, 0)
    with pytest.raises(UserError, match="N, C, H, W"):
        corrupt(x[0], "fog", 1)


def _interior(x: torch.Tensor, margin: int) -> torch.Tensor:
    """Central disk of radius (H/2 - margin): untouched by corners lost in rotation."""
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(
        torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij"
    )
    return (yy**2 + xx**2).sqrt() < min(h, w) / 2 - margin


@pytest.mark.parametrize("shape", SHAPES)
def test_rotate_identity_and_rot90(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    inside = _interior(x, 1)
    assert (rotate(x, 0) - x)[..., inside].abs().max() < 1e-5
    # positive degrees = counter-clockwise as displayed = torch.rot90(k=1) over (H, W)
    assert (rotate(x, 90) - torch.rot90(x, 1, dims=(-2, -1))).abs().max() < 1e-5
    assert (rotate(x, -90) - torch.rot90(x, -1, dims=(-2, -1))).abs().max() < 1e-5
    assert (rotate(x, 180) - torch.flip(x, dims=(-2, -1))).abs().max() < 1e-5
    assert (rotate(rotate(x, 90), -90) - x).abs().max() < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_rotate_round_trip_arbitrary_angle(shape):
    x = _smooth(shape, coarse=5)
    back = rotate(rotate(x, 30.0), -30.0)
    inside = _interior(x, 2)
    assert (back - x)[..., inside].abs().mean() < 0.01
    assert back.shape == x.shape and back.dtype == x.dtype


def test_rotate_direction_single_pixel():
    # A bright pixel right of centre moves to above centre under +90 (CCW).
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 4] = 1.0
    y = rotate(x, 90)
    assert y[0, 0, 0, 2] == pytest.approx(1.0, abs=1e-5)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_rotated_sets():
    x = torch.rand(3, 1, 28, 28)
    sets = rotated_sets(x)
    assert list(sets) == list(range(0, 181, 15))
    assert all(v.shape == x.shape for v in sets.values())
    assert torch.allclose(sets[90], torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)
    assert list(rotated_sets(x, angles=[0, 45])) == [0, 45]
