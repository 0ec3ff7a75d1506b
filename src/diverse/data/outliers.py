"""Synthetic outliers for feature repulsion (HE-CKA): random images that are
clearly not training data, generated on the fly, vectorized over the batch.

Smerkous et al., "Enhancing Diversity in Bayesian Deep Learning via Hyperspherical
Energy Minimization of CKA" (NeurIPS 2024), apply the HE-CKA repulsion and an
entropy term to such outliers (their ``hyper/data/image_ood.py``). The recipe:

1. With probability ``p_transformed`` an outlier is a heavily transformed training
   image: invert, one random warp (elastic displacement, perspective, affine
   ±30° with scale, shear and translation, flips) resampled once, random erasing
   (black, white or noise rectangles), Gaussian blur.
2. Otherwise it is a generated pattern, one per channel "plane": stripes (periodic
   lines at any angle, optionally cross-hatched), random lines, a checkerboard of
   random period, random blocks, gradient (Perlin) noise at a random scale with 1–3
   octaves (optionally ridged, |noise|), or a fill (constant, linear or radial
   gradient). A plane ``s ∈ [0, 1]`` is coloured as ``c0 + (c1 − c0) s`` with
   random levels per channel, so RGB patterns get random colours. For C = 3 an
   image shares one plane over its channels with probability ``p_shared_channels``,
   else every channel gets its own pattern (possibly of another type).
3. Post-transforms, each with its own probability, on every outlier: inverted
   thresholding inside 1–4 random boxes, affine rotation ±180° (with translation,
   zoom 0.8–1.5 and a random fill colour), inversion, Gaussian blur, additive
   Gaussian noise; finally clamp to [0, 1].

Departures from the reference code: it works in normalized pixel space and applies
torchvision transforms per image in a random order; here everything is in raw
[0, 1] pixels, in a fixed order, batched, and the geometric transforms of step 1
are composed into one resampling (sharper than chained ones). Its thresholding is
applied before the post-transforms to generated patterns only; here it is a
post-transform of every outlier. Its "simplex noise" is replaced by ridged Perlin
noise.

Everything random comes from the caller's ``torch.Generator`` (the global RNG is
never touched): the same generator state gives bit-identical outliers on the same
device. Draws are made on the generator's device and moved to the images' device.
Images are ``(N, C, H, W)`` with C ∈ {1, 3} and H, W ≥ 8.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from diverse.checkpoint import publish  # noqa: E402
from diverse.errors import UserError  # noqa: E402

__all__ = [
    "PATTERNS",
    "OutlierConfig",
    "generated_patterns",
    "outlier_grid",
    "outliers_with_sources",
    "synthetic_outliers",
    "transformed_images",
]

PATTERNS: tuple[str, ...] = ("stripes", "lines", "checkerboard", "blocks", "noise", "fill")
"""Pattern types, in the order of :attr:`OutlierConfig.pattern_weights`."""

# Fixed shape parameters of the transformed-image branch (torchvision-style ranges of
# the reference's MNIST recipe).
_SOURCE_TRANSLATE = 0.1  # max shift, fraction of the image size
_SOURCE_SCALE = (0.8, 1.2)
_SOURCE_SHEAR = 15.0  # max |shear| in degrees
_ERASE_SLOTS = 3
_ERASE_AREA = (0.05, 0.4)  # fraction of the image
_ERASE_RATIO = (0.3, 3.3)  # aspect ratio, drawn log-uniformly
_SOURCE_BLUR_SIGMA = (0.1, 4.0)
_ELASTIC_CONTROL = 4  # displacement drawn on a 4x4 grid, upsampled bicubically
# Post-transforms.
_POST_TRANSLATE = 0.1
_POST_SCALE = (0.8, 1.5)
_POST_BLUR_SIGMA = (0.05, 2.0)
_THRESHOLD_BOXES = 4
_THRESHOLD_SIDE = (0.15, 0.5)  # box side, fraction of min(H, W)
_BLUR_RADIUS = 2  # 5-tap Gaussian kernels
# Patterns.
_LINES = 8
_BLOCKS = 6
_OCTAVES = 3
_MIN_CONTRAST = 0.3  # |c1 - c0| of a pattern's two levels is at least this


@dataclass(frozen=True)
class OutlierConfig:
    """Synthetic-outlier recipe (probabilities are per outlier unless stated).

    Fields:
        p_transformed: probability that an outlier is a transformed training image
            rather than a generated pattern (default 0.35; the reference uses 0.35
            for MNIST, 0.4 for CIFAR).
        p_invert_source: invert the training image, x → 1 − x (default 0.5).
        p_erase: probability of each of the 3 random-erasing rectangles (area
            5–40 %, aspect 0.3–3.3; black, white or uniform noise) (default 0.5).
        source_degrees: max |rotation| of the training-image affine (default 30).
        p_perspective: apply a random perspective warp (default 0.5).
        perspective_distortion: max inward move of each corner, as a fraction of
            the half-size, in [0, 1) (default 0.6, as the reference).
        elastic_px: scale (std, pixels) of the smooth elastic displacement field
            (default 2.5; 0 = none).
        p_flip: probability of a horizontal flip and, independently, of a vertical
            flip (default 0.5).
        p_blur_source: Gaussian blur (5 taps, σ ~ U(0.1, 4) px) of the transformed
            image (default 0.6).
        pattern_weights: relative frequencies of :data:`PATTERNS` (stripes, lines,
            checkerboard, blocks, noise, fill); default (1, 1, 1, 1, 2, 0.5).
        p_shared_channels: for C > 1, probability that all channels share one
            pattern (in different colours) instead of one pattern each (0.5).
        p_threshold: inverted thresholding, x → 1[x < t], t ~ U(0.25, 0.75), inside
            1–4 random boxes (default 0.25).
        p_rotate: affine with rotation ±180°, shift ±10 %, zoom 0.8–1.5 and a random
            fill colour (default 0.75).
        p_invert: invert, x → 1 − x (default 0.5).
        p_blur: Gaussian blur, σ ~ U(0.05, 2) px (default 0.3).
        p_noise: add Gaussian noise of std ~ U(0.01, noise_std) (default 0.25).
        noise_std: largest std of the additive noise (default 0.12, about the
            reference's 0.4 in normalized units).
    """

    p_transformed: float = 0.35
    p_invert_source: float = 0.5
    p_erase: float = 0.5
    source_degrees: float = 30.0
    p_perspective: float = 0.5
    perspective_distortion: float = 0.6
    elastic_px: float = 2.5
    p_flip: float = 0.5
    p_blur_source: float = 0.6
    pattern_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 2.0, 0.5)
    p_shared_channels: float = 0.5
    p_threshold: float = 0.25
    p_rotate: float = 0.75
    p_invert: float = 0.5
    p_blur: float = 0.3
    p_noise: float = 0.25
    noise_std: float = 0.12

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "pattern_weights":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                    value):
                raise UserError(f"OutlierConfig.{f.name} must be a finite number, got {value!r}")
            if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise UserError(
                    f"OutlierConfig.{f.name} must be a probability in [0, 1], got {value!r}")
        _check_range("source_degrees", self.source_degrees, 0.0, 180.0, "[0, 180]")
        if not 0.0 <= self.perspective_distortion < 1.0:
            raise UserError("OutlierConfig.perspective_distortion must be in [0, 1), got "
                            f"{self.perspective_distortion!r}")
        _check_range("elastic_px", self.elastic_px, 0.0, math.inf, ">= 0")
        _check_range("noise_std", self.noise_std, 0.0, math.inf, ">= 0")
        w = self.pattern_weights
        if (not isinstance(w, tuple | list) or len(w) != len(PATTERNS)
                or any(isinstance(v, bool) or not isinstance(v, int | float)
                       or not math.isfinite(v) or v < 0 for v in w)
                or sum(w) <= 0):
            raise UserError(f"OutlierConfig.pattern_weights must be {len(PATTERNS)} finite "
                            f"weights >= 0 with a positive sum (for {', '.join(PATTERNS)}), "
                            f"got {w!r}")
        object.__setattr__(self, "pattern_weights", tuple(float(v) for v in w))


def _check_range(name: str, value: float, lo: float, hi: float, allowed: str) -> None:
    if not lo <= value <= hi:
        raise UserError(f"OutlierConfig.{name} must be {allowed}, got {value!r}")


# ---------------------------------------------------------------------------- draws
class _Draw:
    """Random draws from one generator (on its device), returned on ``device``."""

    def __init__(self, generator: torch.Generator, device: torch.device) -> None:
        self.g = generator
        self.device = device

    def uniform(self, *shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        u = torch.rand(shape, generator=self.g, device=self.g.device).to(self.device)
        return u * (hi - lo) + lo

    def normal(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.g, device=self.g.device).to(self.device)

    def bernoulli(self, p: float, *shape: int) -> Tensor:
        return self.uniform(*shape) < p

    def integers(self, lo: int, hi: int, *shape: int) -> Tensor:
        """Uniform integers in [lo, hi) (int64)."""
        return torch.randint(lo, hi, shape, generator=self.g, device=self.g.device).to(
            self.device)


def _grid_coords(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``y`` (1, H, 1) and ``x`` (1, 1, W), in pixels."""
    y = torch.arange(h, device=device, dtype=torch.float32).view(1, h, 1) + 0.5
    x = torch.arange(w, device=device, dtype=torch.float32).view(1, 1, w) + 0.5
    return y, x


def _where_rows(sel: Tensor, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``x`` with rows ``sel`` (n,) bool replaced by ``fn(idx)`` (idx: their indices);
    the transform runs on the selected rows only."""
    idx = sel.nonzero().squeeze(1)
    return x.index_copy(0, idx, fn(idx)) if len(idx) else x


@functools.lru_cache(maxsize=16)
def _bicubic_matrix(size: int, points: int, device: torch.device) -> Tensor:
    """(size, points) bicubic upsampling matrix (align_corners=True), so that
    ``R_h @ z @ R_w.T`` equals ``F.interpolate(z, (h, w), mode="bicubic")``."""
    eye = torch.eye(points, device=device).view(points, 1, points, 1)
    r = F.interpolate(eye, size=(size, 1), mode="bicubic", align_corners=True)
    return r[:, 0, :, 0].T.contiguous()


def _boxes(d: _Draw, n: int, k: int, h: int, w: int, bh: Tensor, bw: Tensor,
           active: Tensor, union: bool = True) -> Tensor:
    """``k`` axis-aligned boxes per image: their union (n, H, W) bool, or each box
    (n, k, H, W) with ``union=False``.

    bh, bw: (n, k) box sizes in pixels, placed uniformly inside the image;
    active: (n, k) bool (an inactive box is empty).
    """
    y0 = (d.uniform(n, k) * (h - bh))[..., None, None]
    x0 = (d.uniform(n, k) * (w - bw))[..., None, None]
    bh, bw = bh[..., None, None], bw[..., None, None]
    y, x = _grid_coords(h, w, d.device)  # (1, H, 1), (1, 1, W)
    rows = (y >= y0) & (y < y0 + bh) & active[..., None, None]  # (n, k, H, 1)
    cols = (x >= x0) & (x < x0 + bw)  # (n, k, 1, W)
    inside = rows & cols
    return inside.any(dim=1) if union else inside


# ------------------------------------------------------------------------- geometry
def _affine_theta(angle: Tensor, scale: Tensor, shear: Tensor, shift: Tensor,
                  flip: Tensor, h: int, w: int) -> Tensor:
    """(n, 2, 3) output→input maps in ``affine_grid``'s normalized coordinates.

    In centred pixel coordinates p (x right, y down) the input point sampled for the
    output point p is ``R(angle) Sh(shear) F p / scale + shift``: rotation by
    ``angle`` degrees (positive turns the content counter-clockwise as displayed,
    row 0 at the top; 90° equals ``torch.rot90(x, 1, (2, 3))``), shear
    angle ``shear`` degrees along x, flips ``F = diag(flip)`` (±1 per axis, (n, 2)),
    zoom ``scale`` (> 1 enlarges the content), ``shift`` (n, 2) in pixels.
    """
    a = torch.deg2rad(angle)
    cos, sin = torch.cos(a), torch.sin(a)
    t = torch.tan(torch.deg2rad(shear))
    # R @ Sh with Sh = [[1, t], [0, 1]], then columns scaled by flips / scale
    m00, m01 = cos, cos * t - sin
    m10, m11 = sin, sin * t + cos
    fx, fy = flip[:, 0] / scale, flip[:, 1] / scale
    # conjugate by D = diag(W/2, H/2): normalized = D^-1 pixel
    theta = torch.stack([
        torch.stack([m00 * fx, m01 * fy * (h / w), shift[:, 0] * 2 / w], dim=-1),
        torch.stack([m10 * fx * (w / h), m11 * fy, shift[:, 1] * 2 / h], dim=-1),
    ], dim=1)
    return theta


def _homography(src: Tensor, dst: Tensor) -> Tensor:
    """(n, 3, 3) projective maps with ``H(src_k) = dst_k`` for 4 points (n, 4, 2).

    Solves the standard 8×8 linear system (h33 = 1) in float64.
    """
    src, dst = src.double(), dst.double()
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -x * u, -y * u], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -x * v, -y * v], dim=-1)
    a = torch.cat([rows_u, rows_v], dim=1)  # (n, 8, 8)
    b = torch.cat([u, v], dim=1)  # (n, 8)
    coef = torch.linalg.solve(a, b)
    return torch.cat([coef, torch.ones_like(coef[:, :1])], dim=1).view(-1, 3, 3)


def _map_grid(m: Tensor, grid: Tensor) -> Tensor:
    """Apply (n, 2, 3) affine or (n, 3, 3) projective maps to (n, H, W, 2) points
    (elementwise; a batched matmul with inner size 3 is slow on CPU)."""
    gx, gy = grid[..., 0], grid[..., 1]
    m = m[:, :, :, None, None]
    out = [m[:, i, 0] * gx + m[:, i, 1] * gy + m[:, i, 2] for i in range(m.shape[1])]
    if len(out) == 3:
        out = [out[0] / out[2], out[1] / out[2]]
    return torch.stack(out, dim=-1)


def _base_grid(n: int, h: int, w: int, device: torch.device) -> Tensor:
    """(n, H, W, 2) normalized pixel-centre coordinates (x, y), align_corners=False."""
    y, x = _grid_coords(h, w, device)
    gx = (2 * x / w - 1).expand(1, h, w)
    gy = (2 * y / h - 1).expand(1, h, w)
    return torch.stack([gx, gy], dim=-1).expand(n, h, w, 2)


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable 5-tap Gaussian blur with one σ (pixels) per image; reflect padding.

    x: (n, C, H, W); sigma: (n,) > 0. Kernel taps exp(−t²/2σ²), t = −2..2, normalized.
    """
    n, c, h, w = x.shape
    r = _BLUR_RADIUS
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True))[:, :, None, None, None]  # (n, 5, 1, 1, 1)
    # shift-and-add: cheaper than a grouped convolution with n C groups on CPU
    z = F.pad(x, (r, r, 0, 0), mode="reflect")
    z = sum(k[:, i] * z[..., i:i + w] for i in range(2 * r + 1))
    z = F.pad(z, (0, 0, r, r), mode="reflect")
    return sum(k[:, i] * z[..., i:i + h, :] for i in range(2 * r + 1))


# ------------------------------------------------------------- transformed branch
def transformed_images(src: Tensor, generator: torch.Generator,
                       cfg: OutlierConfig = OutlierConfig()) -> Tensor:
    """Heavily transformed copies of training images (step 1 of the recipe).

    src: (n, C, H, W) raw images in [0, 1]. Returns (n, C, H, W) float32 in [0, 1],
    before the post-transforms. Order: invert → one composite warp (elastic →
    perspective → affine with flips; zero fill outside the image) → erase → blur.
    """
    _check_images(src, "transformed_images source", allow_empty=True)
    n, c, h, w = src.shape
    d = _Draw(generator, src.device)
    x = src.to(torch.float32)
    inv = d.bernoulli(cfg.p_invert_source, n)[:, None, None, None]
    x = torch.where(inv, 1 - x, x)

    # composite warp: output grid -> elastic -> perspective -> affine -> input
    grid = _base_grid(n, h, w, d.device)
    if cfg.elastic_px > 0:
        coarse = d.normal(n, 2, _ELASTIC_CONTROL, _ELASTIC_CONTROL)
        r_h = _bicubic_matrix(h, _ELASTIC_CONTROL, d.device)
        r_w = _bicubic_matrix(w, _ELASTIC_CONTROL, d.device)
        px_to_unit = torch.tensor([2 / w, 2 / h], device=d.device).view(1, 2, 1, 1)
        field = r_h @ coarse @ r_w.T * (cfg.elastic_px * px_to_unit)
        grid = grid + field.permute(0, 2, 3, 1)
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]],
                           device=d.device).expand(n, 4, 2)
    persp = d.bernoulli(cfg.p_perspective, n)
    moved = corners * (1 - d.uniform(n, 4, 2, hi=cfg.perspective_distortion))
    hom = _where_rows(  # output quad -> full image; identity without perspective
        persp, lambda idx: _homography(moved[idx], corners[idx]).to(torch.float32),
        torch.eye(3, device=d.device).expand(n, 3, 3))
    grid = _map_grid(hom, grid)
    flip = torch.where(d.bernoulli(cfg.p_flip, n, 2), -1.0, 1.0)
    theta = _affine_theta(
        angle=d.uniform(n, lo=-cfg.source_degrees, hi=cfg.source_degrees),
        scale=d.uniform(n, lo=_SOURCE_SCALE[0], hi=_SOURCE_SCALE[1]),
        shear=d.uniform(n, lo=-_SOURCE_SHEAR, hi=_SOURCE_SHEAR),
        shift=d.uniform(n, 2, lo=-_SOURCE_TRANSLATE, hi=_SOURCE_TRANSLATE)
        * torch.tensor([w, h], device=d.device, dtype=torch.float32),
        flip=flip, h=h, w=w)
    grid = _map_grid(theta, grid)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # random erasing: black, white or noise rectangles, painted in turn
    k = _ERASE_SLOTS
    area = d.uniform(n, k, lo=_ERASE_AREA[0], hi=_ERASE_AREA[1]) * (h * w)
    ratio = torch.exp(d.uniform(n, k, lo=math.log(_ERASE_RATIO[0]),
                                hi=math.log(_ERASE_RATIO[1])))
    bh = torch.sqrt(area * ratio).clamp(1.0, h)
    bw = torch.sqrt(area / ratio).clamp(1.0, w)
    active = d.bernoulli(cfg.p_erase, n, k)
    value = d.integers(0, 3, n, k)  # 0 black, 1 white, 2 noise
    noisy = (active & (value == 2)).any(dim=1)
    noise = _where_rows(noisy, lambda idx: d.uniform(len(idx), c, h, w),
                        torch.zeros(n, c, h, w, device=d.device))
    masks = _boxes(d, n, k, h, w, bh, bw, active, union=False)[:, :, None]  # (n, k, 1, H, W)
    for j in range(k):
        v = value[:, j, None, None, None]
        x = torch.where(masks[:, j] & (v < 2), v.to(x.dtype), x)
        x = torch.where(masks[:, j] & (v == 2), noise, x)

    blur = d.bernoulli(cfg.p_blur_source, n)
    sigma = d.uniform(n, lo=_SOURCE_BLUR_SIGMA[0], hi=_SOURCE_BLUR_SIGMA[1])
    x = _where_rows(blur, lambda idx: _gaussian_blur(x[idx], sigma[idx]), x)
    return x.clamp(0.0, 1.0)


# ------------------------------------------------------------------------ patterns
def _stripes(d: _Draw, n: int, h: int, w: int) -> Tensor:
    """Periodic lines at a random angle, period 2..min(H,W)/2 px, duty 0.2–0.8;
    cross-hatched (a second, perpendicular set) with probability 1/4. (n, H, W)."""
    y, x = _grid_coords(h, w, d.device)
    angle = d.uniform(n, 1, 1, hi=math.pi)
    period = d.uniform(n, 1, 1, lo=2.0, hi=max(3.0, min(h, w) / 2))
    duty = d.uniform(n, 1, 1, lo=0.2, hi=0.8)
    phase = d.uniform(n, 2, 1, 1)
    cross = d.bernoulli(0.25, n, 1, 1)
    u = (x * torch.cos(angle) + y * torch.sin(angle)) / period
    v = (-x * torch.sin(angle) + y * torch.cos(angle)) / period
    u, v = u + phase[:, 0], v + phase[:, 1]
    s = u - torch.floor(u) < duty  # fractional part (torch.frac keeps the sign)
    s2 = v - torch.floor(v) < duty
    return (s | (s2 & cross)).float()


def _lines(d: _Draw, n: int, h: int, w: int) -> Tensor:
    """1–8 random straight lines (70 % horizontal/vertical, else any angle), width
    0.8 px to 10 % of the size. (n, H, W)."""
    y, x = _grid_coords(h, w, d.device)
    k = _LINES
    active = d.bernoulli(0.5, n, k)
    active[:, 0] = True
    axis = d.integers(0, 2, n, k).float() * (math.pi / 2)
    angle = torch.where(d.bernoulli(0.7, n, k), axis, d.uniform(n, k, hi=math.pi))
    py = d.uniform(n, k, hi=h)
    px = d.uniform(n, k, hi=w)
    width = d.uniform(n, k, lo=0.8, hi=max(1.5, 0.1 * min(h, w)))
    a = angle[:, None, None]
    dist = (-(x[..., None] - px[:, None, None]) * torch.sin(a)
            + (y[..., None] - py[:, None, None]) * torch.cos(a)).abs()  # (n, H, W, k)
    on = (dist < width[:, None, None] / 2) & active[:, None, None]
    return on.any(dim=-1).float()


def _checkerboard(d: _Draw, n: int, h: int, w: int) -> Tensor:
    """Checkerboard with random integer cell sizes 1..min(H,W)/3 px per axis and a
    random phase. (n, H, W)."""
    y, x = _grid_coords(h, w, d.device)
    top = max(2, min(h, w) // 3)
    cy = d.integers(1, top + 1, n, 1, 1).float()
    cx = d.integers(1, top + 1, n, 1, 1).float()
    oy = d.uniform(n, 1, 1) * cy
    ox = d.uniform(n, 1, 1) * cx
    parity = torch.floor((y - 0.5 + oy) / cy) + torch.floor((x - 0.5 + ox) / cx)
    return torch.frac(parity * 0.5) * 2  # parity >= 0 is an integer: exact 0 or 1


def _blocks(d: _Draw, n: int, h: int, w: int) -> Tensor:
    """1–6 random rectangles (sides 10–60 % of the image) of random levels over a
    random background level, painted in turn. (n, H, W)."""
    k = _BLOCKS
    active = d.bernoulli(0.75, n, k)
    active[:, 0] = True
    bh = d.uniform(n, k, lo=0.1, hi=0.6) * h
    bw = d.uniform(n, k, lo=0.1, hi=0.6) * w
    level = d.uniform(n, k)
    s = d.uniform(n, 1, 1).expand(n, h, w)
    masks = _boxes(d, n, k, h, w, bh, bw, active, union=False)
    for j in range(k):
        s = torch.where(masks[:, j], level[:, j, None, None], s)
    return s


def _perlin(u: Tensor, v: Tensor, grad: Tensor, lattice: int) -> Tensor:
    """Perlin gradient noise at points (u, v) in lattice units.

    u: (P, 1, W), v: (P, H, 1) ≥ 0 with floor(·) + 1 < lattice; grad: (P, 2, L²) unit
    gradients at the lattice points (row-major, index iy L + ix). Returns (P, H, W):
    Σ over the 4 surrounding corners of ⟨g_corner, p − corner⟩, blended with the
    quintic fade 6t⁵ − 15t⁴ + 10t³. Zero at lattice points; |value| ≤ √2/2.
    """
    iu, iv = torch.floor(u), torch.floor(v)
    fu, fv = u - iu, v - iv
    p, hh, ww = v.shape[0], v.shape[1], u.shape[2]
    base = (iv * lattice + iu).long().expand(p, hh, ww).reshape(p, 1, hh * ww)

    def corner(dx: int, dy: int) -> Tensor:
        idx = (base + (dy * lattice + dx)).expand(p, 2, hh * ww)
        g = torch.gather(grad, 2, idx).view(p, 2, hh, ww)
        return g[:, 0] * (fu - dx) + g[:, 1] * (fv - dy)

    su = fu * fu * fu * (fu * (fu * 6 - 15) + 10)
    sv = fv * fv * fv * (fv * (fv * 6 - 15) + 10)
    top = corner(0, 0) + su * (corner(1, 0) - corner(0, 0))
    bottom = corner(0, 1) + su * (corner(1, 1) - corner(0, 1))
    return top + sv * (bottom - top)


def _noise(d: _Draw, n: int, h: int, w: int) -> Tensor:
    """Fractal Perlin noise: base scale 1.5..max(2, min(H,W)/8) cells across
    (log-uniform), 1–3 octaves (frequency ×2, amplitude ×½, at most min(H,W)/4
    cells, i.e. cells of ≥ 4 px), ridged (|noise|) with probability 0.3; min-max
    normalized. (n, H, W)."""
    y, x = _grid_coords(h, w, d.device)
    top = max(2.0, min(h, w) / 4)
    lattice = int(top) + 3
    base = torch.exp(d.uniform(n, 1, lo=math.log(1.5), hi=math.log(max(2.0, min(h, w) / 8))))
    level = torch.arange(_OCTAVES, device=d.device)
    freq = (base * 2.0**level).clamp(max=top)  # (n, O)
    octaves = d.integers(1, _OCTAVES + 1, n, 1)
    ridged = d.bernoulli(0.3, n, 1, 1)
    # evaluate only the octaves in use: (plane, octave) pairs flattened
    used = (level < octaves).flatten().nonzero().squeeze(1)  # (P,)
    p = len(used)
    offset = d.uniform(p, 2, 1, 1)
    angle = d.uniform(p, 1, lattice * lattice, hi=2 * math.pi)
    grad = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)
    f = freq.flatten()[used].view(p, 1, 1)
    layers = _perlin(x / w * f + offset[:, 0], y / h * f + offset[:, 1], grad, lattice)
    amp = (0.5 ** level.float()).repeat(n)[used].view(p, 1, 1)
    s = torch.zeros(n * _OCTAVES, h, w, device=d.device).index_copy(0, used, layers * amp)
    s = s.view(n, _OCTAVES, h, w).sum(dim=1)
    s = torch.where(ridged, s.abs(), s)
    lo = s.amin(dim=(1, 2), keepdim=True)
    hi = s.amax(dim=(1, 2), keepdim=True)
    return (s - lo) / (hi - lo).clamp(min=1e-6)


def _fill(d: _Draw, n: int, h: int, w: int) -> Tensor:
    """Constant (0), linear gradient at a random angle, or radial gradient from a
    random centre, each with probability 1/3, scaled to [0, 1]. (n, H, W)."""
    y, x = _grid_coords(h, w, d.device)
    kind = d.integers(0, 3, n, 1, 1)
    angle = d.uniform(n, 1, 1, hi=2 * math.pi)
    cy = d.uniform(n, 1, 1, hi=h)
    cx = d.uniform(n, 1, 1, hi=w)
    linear = (x / w - 0.5) * torch.cos(angle) + (y / h - 0.5) * torch.sin(angle)
    radial = torch.sqrt(((x - cx) / w) ** 2 + ((y - cy) / h) ** 2)
    s = torch.where(kind == 1, linear, torch.where(kind == 2, radial, torch.zeros_like(radial)))
    lo = s.amin(dim=(1, 2), keepdim=True)
    hi = s.amax(dim=(1, 2), keepdim=True)
    return (s - lo) / (hi - lo).clamp(min=1e-6)


_PATTERN_FNS = (_stripes, _lines, _checkerboard, _blocks, _noise, _fill)


def generated_patterns(count: int, channels: int, h: int, w: int, generator: torch.Generator,
                       cfg: OutlierConfig = OutlierConfig(),
                       device: torch.device | str = "cpu") -> Tensor:
    """Random coloured patterns (step 2 of the recipe): (count, channels, H, W) in [0, 1].

    One pattern type per channel plane, drawn with ``cfg.pattern_weights``; for
    channels > 1 all channels copy the first plane with probability
    ``cfg.p_shared_channels``. A plane ``s ∈ [0, 1]`` becomes ``c0 + (c1 − c0) s``
    per channel, c0 ~ U(0, 1), c1 = c0 ± δ with δ ~ U(0.3, 1) (the sign that stays in
    [0, 1]; if neither does, the far end 0 or 1), so |c1 − c0| ≥ 0.3.
    """
    for name, value, low in (("count", count, 0), ("channels", channels, 1), ("H", h, 8),
                             ("W", w, 8)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"generated_patterns: {name} must be an integer >= {low}, "
                            f"got {value!r}")
    d = _Draw(generator, torch.device(device))
    shared = d.bernoulli(cfg.p_shared_channels, count) if channels > 1 else torch.ones(
        count, dtype=torch.bool, device=d.device)
    # plane index of every (image, channel): shared images use one plane for all channels
    per_image = torch.where(shared, 1, channels)
    start = torch.cumsum(per_image, 0) - per_image
    chan = torch.arange(channels, device=d.device)
    plane_of = start[:, None] + torch.where(shared[:, None], 0, chan)  # (count, C)
    planes = int(per_image.sum())
    weights = torch.tensor(cfg.pattern_weights, dtype=torch.float64)
    cum = torch.cumsum(weights / weights.sum(), 0).to(d.device, torch.float32)
    kind = torch.searchsorted(cum[:-1].contiguous(), d.uniform(planes), right=True)
    s = torch.zeros(planes, h, w, device=d.device)
    for k, fn in enumerate(_PATTERN_FNS):
        idx = (kind == k).nonzero().squeeze(1)
        if len(idx):
            s = s.index_copy(0, idx, fn(d, len(idx), h, w))
    s = s[plane_of]  # (count, C, H, W)
    c0 = d.uniform(count, channels, 1, 1)
    gap = d.uniform(count, channels, 1, 1, lo=_MIN_CONTRAST, hi=1.0)
    far = torch.where(c0 < 0.5, 1.0, 0.0)  # when c0 ± gap both leave [0, 1]
    c1 = torch.where(c0 + gap <= 1, c0 + gap, torch.where(c0 - gap >= 0, c0 - gap, far))
    return (c0 + (c1 - c0) * s).clamp(0.0, 1.0)


# -------------------------------------------------------------------- post-transforms
def _post_transforms(x: Tensor, d: _Draw, cfg: OutlierConfig) -> Tensor:
    """Step 3: threshold in boxes → rotate → invert → blur → noise → clamp."""
    n, c, h, w = x.shape
    k = _THRESHOLD_BOXES
    thr = d.bernoulli(cfg.p_threshold, n)
    active = d.bernoulli(0.5, n, k)
    active[:, 0] = True
    side = min(h, w)
    bh = d.uniform(n, k, lo=_THRESHOLD_SIDE[0], hi=_THRESHOLD_SIDE[1]) * side
    bw = d.uniform(n, k, lo=_THRESHOLD_SIDE[0], hi=_THRESHOLD_SIDE[1]) * side
    t = d.uniform(n, 1, 1, 1, lo=0.25, hi=0.75)

    def threshold(idx: Tensor) -> Tensor:
        mask = _boxes(d, len(idx), k, h, w, bh[idx], bw[idx], active[idx])
        z = x[idx]
        return torch.where(mask[:, None], (z < t[idx]).to(z.dtype), z)

    x = _where_rows(thr, threshold, x)

    rot = d.bernoulli(cfg.p_rotate, n)
    theta_all = _affine_theta(
        angle=d.uniform(n, lo=-180.0, hi=180.0),
        scale=d.uniform(n, lo=_POST_SCALE[0], hi=_POST_SCALE[1]),
        shear=torch.zeros(n, device=d.device),
        shift=d.uniform(n, 2, lo=-_POST_TRANSLATE, hi=_POST_TRANSLATE)
        * torch.tensor([w, h], device=d.device, dtype=torch.float32),
        flip=torch.ones(n, 2, device=d.device), h=h, w=w)
    fill = d.uniform(n, c, 1, 1)

    def rotate(idx: Tensor) -> Tensor:
        grid = _map_grid(theta_all[idx], _base_grid(len(idx), h, w, d.device))
        z = x[idx]
        both = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
        warped = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
        return warped[:, :c] + fill[idx] * (1 - warped[:, c:])

    x = _where_rows(rot, rotate, x)

    inv = d.bernoulli(cfg.p_invert, n)[:, None, None, None]
    x = torch.where(inv, 1 - x, x)

    blur = d.bernoulli(cfg.p_blur, n)
    sigma = d.uniform(n, lo=_POST_BLUR_SIGMA[0], hi=_POST_BLUR_SIGMA[1])
    x = _where_rows(blur, lambda idx: _gaussian_blur(x[idx], sigma[idx]), x)

    noisy = d.bernoulli(cfg.p_noise, n)
    std = d.uniform(n, 1, 1, 1, lo=min(0.01, cfg.noise_std), hi=cfg.noise_std)
    x = _where_rows(noisy, lambda idx: x[idx] + std[idx] * d.normal(len(idx), c, h, w), x)
    return x.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------- public
def _check_images(images: Tensor, what: str, allow_empty: bool) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise UserError(f"{what} must be an (N, C, H, W) tensor, got {shape}")
    n, c, h, w = images.shape
    if c not in (1, 3) or h < 8 or w < 8:
        raise UserError(f"{what} must have C in {{1, 3}} channels and H, W >= 8, got shape "
                        f"{tuple(images.shape)}")
    if not images.is_floating_point():
        raise UserError(f"{what} must be floating point in [0, 1], got dtype {images.dtype}")
    if n == 0 and not allow_empty:
        raise UserError(f"{what} must hold at least one image, got shape {tuple(images.shape)}")


def outliers_with_sources(images: Tensor, count: int, generator: torch.Generator,
                          cfg: OutlierConfig = OutlierConfig()) -> tuple[Tensor, Tensor]:
    """:func:`synthetic_outliers` that also says where each outlier comes from.

    Returns ``(outliers, source)``: outliers (count, C, H, W) float32 in [0, 1] on
    ``images.device``; source (count,) int64, the pool index of the training image
    a transformed outlier was made from, −1 for a generated pattern.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise UserError(f"outlier count must be an integer >= 0, got {count!r}")
    if not isinstance(generator, torch.Generator):
        raise UserError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    _check_images(images, "outlier source images", allow_empty=True)
    _, c, h, w = images.shape
    d = _Draw(generator, images.device)
    transformed = d.bernoulli(cfg.p_transformed, count)
    t_idx = transformed.nonzero().squeeze(1)
    p_idx = (~transformed).nonzero().squeeze(1)
    source = torch.full((count,), -1, dtype=torch.int64, device=d.device)
    out = torch.empty(count, c, h, w, device=d.device)
    if len(t_idx):
        if images.shape[0] == 0:
            raise UserError("outlier source images are empty but p_transformed = "
                            f"{cfg.p_transformed} > 0; pass training images or set it to 0")
        pick = d.integers(0, images.shape[0], len(t_idx))
        src = images[pick].to(torch.float32)
        lo, hi = float(src.min()), float(src.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise UserError(f"outlier source images must be raw pixels in [0, 1] (before "
                            f"normalization), got values in [{lo:.3g}, {hi:.3g}]")
        out[t_idx] = transformed_images(src, generator, cfg)
        source[t_idx] = pick
    if len(p_idx):
        out[p_idx] = generated_patterns(len(p_idx), c, h, w, generator, cfg, d.device)
    return _post_transforms(out, d, cfg), source


def synthetic_outliers(images: Tensor, count: int, generator: torch.Generator,
                       cfg: OutlierConfig = OutlierConfig()) -> Tensor:
    """``count`` synthetic outliers shaped like ``images``, in raw [0, 1] pixels.

    images: (N, C, H, W) pool of raw training images in [0, 1] (C ∈ {1, 3},
    H, W ≥ 8), the source of the transformed-image branch (may be empty when
    ``cfg.p_transformed`` is 0). Returns (count, C, H, W) float32 on
    ``images.device``; normalize it like the training inputs before the model.
    Deterministic given the generator state; see the module docstring for the
    recipe and :class:`OutlierConfig` for its probabilities.
    """
    return outliers_with_sources(images, count, generator, cfg)[0]


def outlier_grid(images: Tensor, path: Path, columns: int = 8, title: str = "") -> None:
    """Save ``images`` (N, C, H, W) in [0, 1] as a PNG picture grid, ``columns`` wide,
    row by row, one pixel of gray between cells (grayscale for C = 1)."""
    _check_images(images, "outlier_grid images", allow_empty=False)
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise UserError(f"outlier_grid columns must be an integer >= 1, got {columns!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"outlier_grid: directory {str(path.parent)!r} does not exist")
    n, c, h, w = images.shape
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    pad = 1
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 0.5, dtype=np.float32)
    pix = images.detach().to("cpu", torch.float32).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, q = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y0:y0 + h, x0:x0 + w] = pix[i]
    scale = 0.04  # inches per pixel
    fig, ax = plt.subplots(figsize=(canvas.shape[1] * scale, canvas.shape[0] * scale))
    if c == 1:
        ax.imshow(canvas[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
