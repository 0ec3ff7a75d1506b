"""Image corruptions (CIFAR-10-C style) and rotations, as pure functions on tensors.

Images are ``(N, C, H, W)`` floats in [0, 1]; C = 1 (28x28 grayscale, e.g.
Fashion-MNIST) or C = 3 (32x32 RGB, e.g. CIFAR). Every corruption
``fn(x, severity, seed) -> (N, C, H, W)`` keeps shape and dtype, clips to [0, 1], and
is deterministic given ``seed`` (a private ``torch.Generator``; global RNG state is
never touched). Severities are 1..5, increasing in strength. Random draws are made
once per call for the whole batch, so different images get different noise; the same
``seed`` at different severities reuses the same draws (severity only rescales them),
which makes the effect grow with severity image by image for most types.

This follows Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations" (ICLR 2019), re-implemented with
torch/numpy/scipy only. Departures from their code are noted per type. Severity
parameters (index = severity - 1):

================= ============================================ ==========================
name              parameter(s) for severities 1..5             notes
================= ============================================ ==========================
gaussian_noise    sigma = .04 .06 .08 .09 .10                  as CIFAR-10-C
shot_noise        lam = 500 250 100 75 50                      Poisson(lam x) / lam
impulse_noise     amount = .01 .02 .03 .05 .07                 salt & pepper per element
speckle_noise     c = .06 .10 .12 .16 .20                      x + x N(0, c^2)
gaussian_blur     sigma (px) = .4 .6 .7 .8 1.0                 as CIFAR-10-C
defocus_blur      radius (px) = .75 1 1.25 1.5 2               anti-aliased disk kernel
motion_blur       length (px) = 3 4 5 6 7                      centred line, angle U(-45,45)
zoom_blur         max zoom = 1.05 1.10 1.15 1.20 1.25          copies every .01 from 1
fog               c = .2 .5 .75 1.0 1.5                        4 octaves, decay .6
snow              density = .01 .02 .03 .04 .06,               bright streaks, seeded
                  length (px) = 3 4 5 6 7                      angle U(-45,45)
brightness        c = .05 .10 .15 .20 .30                      HSV value + c
contrast          c = .75 .5 .4 .3 .15                         (x - mean) c + mean
saturate          k = 2 3 5 10 20                              see :func:`saturate`
pixelate          cell (px) = 2 3 4 6 8                        block means, centred grid
jpeg_like         quality = 80 65 58 50 40                     8x8 DCT quantization
elastic_transform alpha (px) = .5 1 1.5 2 2.5, sigma 3 px      max displacement alpha
================= ============================================ ==========================

Rotations: :func:`rotate` turns each image about its centre, counter-clockwise (as
displayed, row 0 at the top) for positive degrees; :func:`rotated_sets` builds the
RotatedMNIST-style sweep of angles used to plot accuracy / calibration against angle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F
from torch import Tensor

from diverse.errors import UserError

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# --------------------------------------------------------------------------- tables
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_NOISE = (500.0, 250.0, 100.0, 75.0, 50.0)
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)
SPECKLE_NOISE = (0.06, 0.10, 0.12, 0.16, 0.20)
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)
DEFOCUS_BLUR = (0.75, 1.0, 1.25, 1.5, 2.0)
MOTION_BLUR = (3.0, 4.0, 5.0, 6.0, 7.0)
ZOOM_BLUR = (1.05, 1.10, 1.15, 1.20, 1.25)
FOG = (0.2, 0.5, 0.75, 1.0, 1.5)
SNOW = ((0.01, 3.0), (0.02, 4.0), (0.03, 5.0), (0.04, 6.0), (0.06, 7.0))
BRIGHTNESS = (0.05, 0.10, 0.15, 0.20, 0.30)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
SATURATE = (2.0, 3.0, 5.0, 10.0, 20.0)
PIXELATE = (2, 3, 4, 6, 8)
JPEG_QUALITY = (80, 65, 58, 50, 40)
ELASTIC = (0.5, 1.0, 1.5, 2.0, 2.5)
_ELASTIC_SIGMA = 3.0
_FOG_OCTAVES = (2, 4, 8, 16)
_FOG_DECAY = 0.6
#: Maximum |angle| (degrees) of motion-blur and snow streaks, as CIFAR-10-C.
_MAX_ANGLE = 45.0

# Standard (IJG / JPEG Annex K) quantization tables at quality 50.
_Q_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
)
_Q_CHROMA = np.full((8, 8), 99.0)
_Q_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]
# JFIF RGB <-> YCbCr (offset 128 on chroma is applied separately).
_RGB_TO_YCC = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)
#: ITU-R BT.601 luma weights for RGB -> gray.
_LUMA = (0.299, 0.587, 0.114)


# -------------------------------------------------------------------------- helpers
def _param(table: Sequence, severity: int, name: str):
    """Table entry for ``severity`` (1..5); UserError naming the allowed values."""
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise UserError(
            f"corruption {name!r}: severity must be one of {list(SEVERITIES)}, got {severity!r}"
        )
    return table[severity - 1]


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _rand(shape: Sequence[int], g: torch.Generator, like: Tensor) -> Tensor:
    return torch.rand(tuple(shape), generator=g).to(like.dtype)


def _randn(shape: Sequence[int], g: torch.Generator, like: Tensor) -> Tensor:
    return torch.randn(tuple(shape), generator=g).to(like.dtype)


def _filter(x: Tensor, kernel: Tensor) -> Tensor:
    """Correlate every channel with ``kernel`` (reflect padding, same size; replicate
    padding when the kernel is wider than the image).

    x: (N, C, H, W); kernel: (k, k) shared, or (N, k, k) one per image (k odd).
    """
    n, c, h, w = x.shape
    k = kernel.shape[-1]
    p = k // 2
    kernel = kernel.to(x.dtype)
    # reflect needs p < size; images smaller than the kernel (8×8 digits) replicate edges
    xp = F.pad(x, (p, p, p, p), mode="reflect" if p < min(h, w) else "replicate")
    if kernel.dim() == 2:
        weight = kernel.expand(c, 1, k, k)
        return F.conv2d(xp, weight, groups=c)
    weight = kernel.repeat_interleave(c, dim=0)[:, None]
    out = F.conv2d(xp.reshape(1, n * c, h + 2 * p, w + 2 * p), weight, groups=n * c)
    return out.reshape(n, c, h, w)


def _gaussian_kernel(sigma: float) -> Tensor:
    """(k, k) normalized Gaussian, k = 2 ceil(3 sigma) + 1."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    return torch.outer(g, g)


def _disk_kernel(radius: float, sub: int = 16) -> Tensor:
    """(k, k) disk of ``radius`` pixels; each entry is the pixel's area covered."""
    r = math.ceil(radius)
    offsets = (torch.arange(sub, dtype=torch.float64) + 0.5) / sub - 0.5
    centres = torch.arange(-r, r + 1, dtype=torch.float64)
    pts = (centres[:, None] + offsets[None, :]).reshape(-1)  # (k * sub,)
    inside = (pts[:, None] ** 2 + pts[None, :] ** 2 <= radius**2).to(torch.float64)
    k = 2 * r + 1
    cover = inside.reshape(k, sub, k, sub).mean(dim=(1, 3))
    return cover / cover.sum()


def _line_kernels(length: float, angles: Tensor) -> Tensor:
    """(N, k, k) centred line segments of ``length`` px at ``angles`` (degrees, CCW).

    Points along the segment are splatted bilinearly; each kernel has maximum 1.
    """
    r = math.ceil(length / 2) + 1
    k = 2 * r + 1
    t = torch.linspace(-length / 2, length / 2, int(16 * length) + 1, dtype=torch.float64)
    rad = torch.deg2rad(angles.to(torch.float64))[:, None]
    xs = r + t[None] * torch.cos(rad)  # column
    ys = r - t[None] * torch.sin(rad)  # row (y down: CCW means up)
    kernels = torch.zeros(len(angles), k * k, dtype=torch.float64)
    x0, y0 = xs.floor(), ys.floor()
    for dx in (0, 1):
        for dy in (0, 1):
            wx = 1 - (xs - x0 - dx).abs()
            wy = 1 - (ys - y0 - dy).abs()
            idx = ((y0 + dy) * k + (x0 + dx)).long()
            kernels.scatter_add_(1, idx, wx * wy)
    kernels = kernels.reshape(-1, k, k)
    return kernels / kernels.amax(dim=(1, 2), keepdim=True)


def _angles(n: int, g: torch.Generator) -> Tensor:
    return (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * _MAX_ANGLE


def _zoom(x: Tensor, z: float) -> Tensor:
    """Zoom by ``z`` >= 1 about the centre, keeping size (bilinear). (N,C,H,W)."""
    theta = torch.tensor([[1 / z, 0.0, 0.0], [0.0, 1 / z, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    """(N, 1, H, W) luma of RGB x, or x itself when C = 1."""
    if x.shape[1] == 3:
        w = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    return x.mean(dim=1, keepdim=True)


# ---------------------------------------------------------------------------- noise
def gaussian_noise(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """x + N(0, sigma^2) per element. x: (N, C, H, W) -> (N, C, H, W)."""
    sigma = _param(GAUSSIAN_NOISE, severity, "gaussian_noise")
    z = _randn(x.shape, _generator(seed), x)
    return (x + sigma * z).clamp(0, 1)


def shot_noise(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Poisson(lam x) / lam per element. x: (N, C, H, W) -> (N, C, H, W)."""
    lam = _param(SHOT_NOISE, severity, "shot_noise")
    rate = (x.to(torch.float64) * lam).clamp_min(0)
    out = torch.poisson(rate, generator=_generator(seed)) / lam
    return out.to(x.dtype).clamp(0, 1)


def impulse_noise(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Salt & pepper: each element is set to 0 or 1 (equally likely) w.p. ``amount``.

    x: (N, C, H, W) -> (N, C, H, W). Like skimage's ``s&p`` used by CIFAR-10-C.
    """
    amount = _param(IMPULSE_NOISE, severity, "impulse_noise")
    g = _generator(seed)
    hit = _rand(x.shape, g, x) < amount
    salt = (_rand(x.shape, g, x) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x).clamp(0, 1)


def speckle_noise(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Multiplicative noise x + x N(0, c^2). x: (N, C, H, W) -> (N, C, H, W)."""
    c = _param(SPECKLE_NOISE, severity, "speckle_noise")
    z = _randn(x.shape, _generator(seed), x)
    return (x + x * c * z).clamp(0, 1)


# ---------------------------------------------------------------------------- blurs
def gaussian_blur(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Gaussian blur of std ``sigma`` px (reflect padding); ``seed`` unused.

    x: (N, C, H, W) -> (N, C, H, W).
    """
    sigma = _param(GAUSSIAN_BLUR, severity, "gaussian_blur")
    return _filter(x, _gaussian_kernel(sigma)).clamp(0, 1)


def defocus_blur(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Blur with a disk of ``radius`` px (area-weighted, anti-aliased); ``seed`` unused.

    x: (N, C, H, W) -> (N, C, H, W). CIFAR-10-C adds a small Gaussian "alias blur"
    after a hard disk; the area-weighted disk replaces it here.
    """
    radius = _param(DEFOCUS_BLUR, severity, "defocus_blur")
    return _filter(x, _disk_kernel(radius)).clamp(0, 1)


def motion_blur(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Average along a centred line of ``length`` px at a seeded angle per image.

    x: (N, C, H, W) -> (N, C, H, W). Angles ~ U(-45, 45) degrees as in CIFAR-10-C
    (which uses ImageMagick's one-sided motion blur; this kernel is symmetric).
    """
    length = _param(MOTION_BLUR, severity, "motion_blur")
    kernels = _line_kernels(length, _angles(len(x), _generator(seed)))
    kernels = kernels / kernels.sum(dim=(1, 2), keepdim=True)
    return _filter(x, kernels).clamp(0, 1)


def zoom_blur(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Mean of x and copies zoomed about the centre by 1.01, 1.02, ... < max zoom.

    x: (N, C, H, W) -> (N, C, H, W); ``seed`` unused. As CIFAR-10-C
    (``np.arange(1, max_zoom, 0.01)``).
    """
    top = _param(ZOOM_BLUR, severity, "zoom_blur")
    zooms = [1 + 0.01 * i for i in range(1, round((top - 1) / 0.01))]
    out = x.clone()
    for z in zooms:
        out = out + _zoom(x, z)
    return (out / (len(zooms) + 1)).clamp(0, 1)


# -------------------------------------------------------------------------- weather
def _fog_map(n: int, h: int, w: int, g: torch.Generator, like: Tensor) -> Tensor:
    """(n, 1, h, w) smooth noise in [0, 1]: octaves of bicubically upsampled noise."""
    total = torch.zeros(n, 1, h, w, dtype=like.dtype)
    for i, size in enumerate(_FOG_OCTAVES):
        noise = _rand((n, 1, size, size), g, like)
        up = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)
        total = total + _FOG_DECAY**i * up
    lo = total.amin(dim=(2, 3), keepdim=True)
    hi = total.amax(dim=(2, 3), keepdim=True)
    return (total - lo) / (hi - lo).clamp_min(1e-12)


def fog(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Add ``c`` times a smooth noise map, then rescale to keep the image maximum.

    ``(x + c f) max(x) / (max(x) + c)`` with f in [0, 1] the same for all channels, as
    CIFAR-10-C, whose diamond-square plasma fractal is replaced by octaves of upsampled
    noise (grids 2, 4, 8, 16; amplitude decay 0.6). x: (N, C, H, W) -> (N, C, H, W).
    """
    c = _param(FOG, severity, "fog")
    n, _, h, w = x.shape
    f = _fog_map(n, h, w, _generator(seed), x)
    m = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x + c * f) * m / (m + c)).clamp(0, 1)


def snow(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Add bright streaks: seeded flakes smeared along a line at a seeded angle.

    Flakes are the pixels whose uniform draw is below ``density`` (so a higher severity
    adds flakes to the same ones), with brightness U(0.5, 1), smeared by a line of
    ``length`` px at an angle ~ U(-45, 45) per image, and added to every channel.
    Simpler than CIFAR-10-C's snow (no background whitening or motion-blurred
    zoomed layers). x: (N, C, H, W) -> (N, C, H, W).
    """
    density, length = _param(SNOW, severity, "snow")
    n, _, h, w = x.shape
    g = _generator(seed)
    angles = _angles(n, g)
    u = _rand((n, 1, h, w), g, x)
    bright = 0.5 + 0.5 * _rand((n, 1, h, w), g, x)
    flakes = torch.where(u < density, bright, torch.zeros_like(bright))
    layer = _filter(flakes, _line_kernels(length, angles))
    return (x + layer.clamp(0, 1)).clamp(0, 1)


def brightness(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Raise the HSV value V = max over channels by ``c``; hue and saturation kept.

    x: (N, C, H, W) -> (N, C, H, W); ``seed`` unused. Scaling a pixel by V'/V is the
    HSV round trip of CIFAR-10-C; black pixels become gray V'. For C = 1, x + c.
    """
    c = _param(BRIGHTNESS, severity, "brightness")
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    scaled = x * v_new / v.clamp_min(1e-12)
    return torch.where(v > 0, scaled, v_new.expand_as(x)).clamp(0, 1)


def contrast(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Shrink towards the per-image mean: ``(x - mean) c + mean``; ``seed`` unused.

    x: (N, C, H, W) -> (N, C, H, W); the mean is over (C, H, W), as CIFAR-10-C.
    """
    c = _param(CONTRAST, severity, "contrast")
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - m) * c + m).clamp(0, 1)


# -------------------------------------------------------------------------- digital
def saturate(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Over-saturate by ``k``; ``seed`` unused. x: (N, C, H, W) -> (N, C, H, W).

    RGB: push each pixel away from its luma, ``gray + k (x - gray)`` (chroma times k).
    Grayscale has no chroma, so there it amplifies contrast about the per-image mean,
    ``mean + k (x - mean)`` (the opposite of :func:`contrast`), which drives pixels to
    0 or 1. CIFAR-10-C scales HSV saturation by (0.3, 0.1, 2, 5, 20) and adds
    (0, 0, 0, 0.1, 0.2); its two desaturating levels are replaced by amplifying ones
    so that strength grows with severity.
    """
    k = _param(SATURATE, severity, "saturate")
    if x.shape[1] == 3:
        centre = _gray(x)
    else:
        centre = x.mean(dim=(1, 2, 3), keepdim=True)
    return (centre + k * (x - centre)).clamp(0, 1)


def pixelate(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Replace each ``cell`` x ``cell`` block by its mean; ``seed`` unused.

    x: (N, C, H, W) -> (N, C, H, W). The block grid is centred on the image; partial
    edge blocks average over edge-replicated pixels. CIFAR-10-C resizes by factors
    (0.95 .. 0.65) with PIL BOX down and up; on 28-32 px that makes non-integer cells
    whose aliasing makes the error non-monotone in severity, hence integer cells.
    """
    cell = _param(PIXELATE, severity, "pixelate")
    h, w = x.shape[-2:]
    ph, pw = -h % cell, -w % cell
    top, left = ph // 2, pw // 2
    xp = F.pad(x, (left, pw - left, top, ph - top), mode="replicate")
    small = F.avg_pool2d(xp, cell)
    big = small.repeat_interleave(cell, dim=-2).repeat_interleave(cell, dim=-1)
    return big[..., top : top + h, left : left + w].clamp(0, 1)


def _quant_table(base: np.ndarray, quality: int) -> np.ndarray:
    """IJG quality scaling of a quantization table."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((base * scale + 50) / 100), 1, 255)


def jpeg_like(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """JPEG-style loss: 8x8 block DCT, quantize with IJG tables at ``quality``, invert.

    x: (N, C, H, W) -> (N, C, H, W); ``seed`` unused. RGB goes through JFIF YCbCr
    (luma table for Y, chroma table for Cb, Cr); gray uses the luma table. Sides are
    edge-padded to a multiple of 8 and cropped back. Departures from a JPEG codec: no
    chroma subsampling, no entropy coding (lossless anyway).
    """
    quality = _param(JPEG_QUALITY, severity, "jpeg_like")
    a = x.detach().cpu().to(torch.float64).numpy() * 255.0
    n, c, h, w = a.shape
    if c == 3:
        a = np.einsum("ij,njhw->nihw", _RGB_TO_YCC, a)
        a[:, 1:] += 128.0
        tables = [_Q_LUMA, _Q_CHROMA, _Q_CHROMA]
    else:
        tables = [_Q_LUMA] * c
    q = np.stack([_quant_table(t, quality) for t in tables])  # (C, 8, 8)
    ph, pw = -h % 8, -w % 8
    a = np.pad(a - 128.0, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")
    hb, wb = a.shape[2] // 8, a.shape[3] // 8
    blocks = a.reshape(n, c, hb, 8, wb, 8).transpose(0, 1, 2, 4, 3, 5)
    coef = scipy.fft.dctn(blocks, axes=(-2, -1), norm="ortho")
    qc = q[None, :, None, None]
    coef = np.round(coef / qc) * qc
    blocks = scipy.fft.idctn(coef, axes=(-2, -1), norm="ortho")
    a = blocks.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, hb * 8, wb * 8)[:, :, :h, :w] + 128.0
    if c == 3:
        a[:, 1:] -= 128.0
        a = np.einsum("ij,njhw->nihw", np.linalg.inv(_RGB_TO_YCC), a)
    out = torch.from_numpy(a / 255.0).to(dtype=x.dtype, device=x.device)
    return out.clamp(0, 1)


def elastic_transform(x: Tensor, severity: int, seed: int = 0) -> Tensor:
    """Warp by a smooth random displacement field of maximum ``alpha`` px.

    The field is U(-1, 1) noise per pixel and axis, Gaussian-smoothed (sigma 3 px),
    scaled so its largest |component| per image is ``alpha``; sampled with bilinear
    ``grid_sample`` and reflection padding. CIFAR-10-C also applies a random affine
    first; that part is left out. x: (N, C, H, W) -> (N, C, H, W).
    """
    alpha = _param(ELASTIC, severity, "elastic_transform")
    n, _, h, w = x.shape
    noise = _rand((n, 2, h, w), _generator(seed), x) * 2 - 1
    field = _filter(noise, _gaussian_kernel(_ELASTIC_SIGMA))
    field = field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    disp = alpha * field  # (N, 2, H, W) in px: (dx, dy)
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=x.dtype).view(1, 2, 1, 1)
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=x.dtype)
    base = F.affine_grid(eye.expand(n, 2, 3), [n, 1, h, w], align_corners=False)
    grid = base + (disp * scale).permute(0, 2, 3, 1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.clamp(0, 1)


#: Corruption name -> ``fn(x, severity, seed)``; x: (N, C, H, W) in [0, 1].
CORRUPTIONS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "fog": fog,
    "snow": snow,
    "brightness": brightness,
    "contrast": contrast,
    "saturate": saturate,
    "pixelate": pixelate,
    "jpeg_like": jpeg_like,
    "elastic_transform": elastic_transform,
}
#: Corruptions whose output depends on ``seed``; the others ignore it.
RANDOM_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "motion_blur",
    "fog",
    "snow",
    "elastic_transform",
)


def corrupt(x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5). x: (N, C, H, W) in [0, 1].

    Returns (N, C, H, W), same dtype, in [0, 1]. Raises :class:`UserError` for an
    unknown name, a severity outside 1..5, or an input that is not 4-D.
    """
    if name not in CORRUPTIONS:
        raise UserError(f"unknown corruption {name!r}; allowed: {', '.join(CORRUPTIONS)}")
    if x.dim() != 4:
        raise UserError(f"corrupt expects images (N, C, H, W), got shape {tuple(x.shape)}")
    _param(SEVERITIES, severity, name)
    return CORRUPTIONS[name](x, severity, seed)


# ------------------------------------------------------------------------ rotations
def rotate(x: Tensor, degrees: float) -> Tensor:
    """Rotate each image about its centre by ``degrees``, counter-clockwise as displayed.

    x: (N, C, H, W) -> (N, C, H, W). Bilinear ``grid_sample``, zeros outside,
    ``align_corners=False``; the rotation is in pixel units, so non-square images are
    not sheared. ``rotate(x, 90)`` equals ``torch.rot90(x, 1, dims=(-2, -1))`` for
    square x.
    """
    n, _, h, w = x.shape
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    # Output pixel p (centred px, x right, y down) samples input R^-1 p; a CCW turn on
    # screen (y down) is R = [[c, s], [-s, c]], so R^-1 = [[c, -s], [s, c]]. Normalized
    # coordinates divide x by W/2 and y by H/2, hence the aspect factors.
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotated_sets(x: Tensor, angles: Iterable[int] = range(0, 181, 15)) -> dict[int, Tensor]:
    """RotatedMNIST-style sweep: ``{angle: rotate(x, angle)}`` for each angle (degrees).

    x: (N, C, H, W); each value (N, C, H, W). Used to plot accuracy and calibration
    against rotation angle.
    """
    return {int(a): rotate(x, float(a)) for a in angles}
