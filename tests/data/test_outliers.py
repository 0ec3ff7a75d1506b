"""Synthetic outliers of diverse.data.outliers (HE-CKA's outlier generator)."""

from __future__ import annotations

import math
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.ndimage  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diverse.data import outliers as O  # noqa: E402
from diverse.data.outliers import (  # noqa: E402
    PATTERNS,
    OutlierConfig,
    generated_patterns,
    outlier_grid,
    outliers_with_sources,
    synthetic_outliers,
)
from diverse.errors import UserError  # noqa: E402

SHAPES = [(1, 28), (3, 32)]
#: Every post-transform and every optional source transform switched off.
QUIET = OutlierConfig(p_invert_source=0.0, p_erase=0.0, p_blur_source=0.0, p_threshold=0.0,
                      p_rotate=0.0, p_invert=0.0, p_blur=0.0, p_noise=0.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _digits(n: int, c: int, h: int, seed: int = 0) -> torch.Tensor:
    """(n, c, h, h) MNIST-like pool: a bright ring and bar (≈ 1.5 px strokes) on black."""
    g = _gen(seed)
    y = torch.arange(h).view(1, h, 1) + 0.5
    x = torch.arange(h).view(1, 1, h) + 0.5
    cx = torch.rand(n, 1, 1, generator=g) * h * 0.4 + h * 0.3
    cy = torch.rand(n, 1, 1, generator=g) * h * 0.4 + h * 0.3
    r = torch.rand(n, 1, 1, generator=g) * h * 0.15 + h * 0.15
    ring = (((x - cx) ** 2 + (y - cy) ** 2).sqrt() - r).abs() < 1.5
    bar = ((x - cx).abs() < 1.5) & ((y - cy).abs() < r * 1.3)
    img = (ring | bar).float()[:, None].expand(n, c, h, h)
    return F.avg_pool2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _rms_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) root-mean-square pixel differences."""
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double()) / math.sqrt(
        a[0].numel())


# ----------------------------------------------------------------------- contract
@pytest.mark.parametrize(("c", "h"), SHAPES)
def test_shape_dtype_range(c, h):
    pool = _digits(20, c, h).double()  # any floating dtype in; float32 out
    x = synthetic_outliers(pool, 96, _gen(0))
    assert x.shape == (96, c, h, h)
    assert x.dtype == torch.float32
    assert bool(torch.isfinite(x).all())
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # both ends of the range are used (clamped noise, thresholding, inversions)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert synthetic_outliers(pool, 0, _gen(0)).shape == (0, c, h, h)


def test_non_square_images():
    pool = torch.rand(5, 3, 12, 20, generator=_gen(1))
    x = synthetic_outliers(pool, 40, _gen(2), OutlierConfig(p_transformed=0.5))
    assert x.shape == (40, 3, 12, 20)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


@pytest.mark.parametrize(("c", "h"), SHAPES)
def test_same_seed_identical_other_seed_different(c, h):
    pool = _digits(16, c, h)
    a = synthetic_outliers(pool, 48, _gen(7))
    b = synthetic_outliers(pool, 48, _gen(7))
    other = synthetic_outliers(pool, 48, _gen(8))
    assert torch.equal(a, b)
    # different seeds: every single outlier differs
    assert bool(((a - other).abs().flatten(1).amax(dim=1) > 1e-3).all())
    # the generator state advances: a second call from the same generator differs
    g = _gen(7)
    first, second = synthetic_outliers(pool, 48, g), synthetic_outliers(pool, 48, g)
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    synthetic_outliers(_digits(8, 3, 32), 64, _gen(0))
    generated_patterns(16, 1, 28, 28, _gen(1))
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------- branches
@pytest.mark.parametrize("p", [0.35, 0.8])
def test_branch_fraction_is_binomial(p):
    n = 3000
    pool = torch.rand(10, 1, 8, 8, generator=_gen(3))
    _, source = outliers_with_sources(pool, n, _gen(4), OutlierConfig(p_transformed=p))
    frac = float((source >= 0).double().mean())
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 binomial standard deviations
    used = source[source >= 0]
    assert int(used.min()) >= 0 and int(used.max()) < 10
    assert len(torch.unique(used)) == 10  # sources spread over the whole pool
    assert bool(((source == -1) | (source >= 0)).all())


@pytest.mark.parametrize(("c", "h"), SHAPES)
def test_p0_has_no_training_content(c, h):
    cfg = OutlierConfig(p_transformed=0.0)
    pool = _digits(64, c, h)
    x, source = outliers_with_sources(pool, 128, _gen(5), cfg)
    assert bool((source == -1).all())
    # the output does not depend on the pool at all, which may even be empty
    other = torch.rand(64, c, h, h, generator=_gen(6))
    assert torch.equal(x, synthetic_outliers(other, 128, _gen(5), cfg))
    assert torch.equal(x, synthetic_outliers(pool[:0], 128, _gen(5), cfg))
    # and no outlier is near a pool image, though pool images come within 0.05 RMS of
    # each other
    nearest_pool_pair = float((_rms_pairs(pool, pool) + 9 * torch.eye(len(pool))).min())
    assert nearest_pool_pair < 0.1
    assert float(_rms_pairs(x, pool).min()) > 0.15


def test_p1_every_outlier_is_a_warped_pool_image():
    # constant pool images with distinct levels: with the recipe's optional colour
    # changes off, a warp (zero fill outside) keeps the level as the maximum
    n = 16
    levels = torch.linspace(0.2, 0.8, n)
    pool = levels.view(n, 1, 1, 1).expand(n, 1, 28, 28).clone()
    x, source = outliers_with_sources(pool, 200, _gen(9), replace(QUIET, p_transformed=1.0))
    assert bool((source >= 0).all())
    torch.testing.assert_close(x.flatten(1).amax(dim=1), levels[source], atol=1e-5, rtol=0)
    # pixels sampled inside the source keep its level (bilinear weights sum to one);
    # the rest is the zero fill of the warp (perspective and zoom-out shrink the content)
    at_level = ((x - levels[source].view(-1, 1, 1, 1)).abs() < 1e-5).flatten(1).double()
    assert float(at_level.mean(dim=1).min()) > 0.1
    assert float(at_level.mean(dim=1).median()) > 0.4
    zero_or_level = (x == 0) | (at_level.view_as(x) > 0)
    assert float(zero_or_level.double().mean()) > 0.9  # only edge pixels are mixed


@pytest.mark.parametrize(("c", "h"), SHAPES)
def test_p1_full_recipe_depends_on_every_source(c, h):
    cfg = OutlierConfig(p_transformed=1.0)
    pool = _digits(32, c, h)
    x, source = outliers_with_sources(pool, 64, _gen(10), cfg)
    other = torch.rand(32, c, h, h, generator=_gen(11))
    y, source_y = outliers_with_sources(other, 64, _gen(10), cfg)
    assert torch.equal(source, source_y)
    assert bool(((x - y).abs().flatten(1).amax(dim=1) > 1e-3).all())


# ----------------------------------------------------------------------- patterns
@pytest.mark.parametrize(("c", "h"), SHAPES)
def test_patterns_vary_and_are_diverse(c, h):
    x = synthetic_outliers(torch.zeros(0, c, h, h), 256, _gen(12),
                           OutlierConfig(p_transformed=0.0))
    std = x.flatten(1).std(dim=1)
    assert float((std > 0.05).double().mean()) > 0.9
    rms = _rms_pairs(x, x)
    off = rms[~torch.eye(len(x), dtype=torch.bool)]
    assert float(off.mean()) > 0.25  # iid uniform images would give 1/√6 ≈ 0.41
    assert float(off.min()) > 0.0  # no duplicates
    if c == 3:  # colours: channels are not all equal
        spread = (x - x.mean(dim=1, keepdim=True)).abs().flatten(1).amax(dim=1)
        assert float((spread > 0.1).double().mean()) > 0.8


@pytest.mark.parametrize("kind", PATTERNS)
def test_each_pattern_type(kind):
    weights = tuple(float(k == kind) for k in PATTERNS)
    s = generated_patterns(200, 1, 28, 28, _gen(13), OutlierConfig(pattern_weights=weights))
    assert s.shape == (200, 1, 28, 28)
    assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0
    std = s.flatten(1).std(dim=1)
    varying = float((std > 0.02).double().mean())
    if kind == "fill":  # one third constant, two thirds linear or radial gradients
        assert 0.5 < varying < 0.8
    else:
        assert varying > 0.9
    distinct = torch.tensor([torch.unique(im.round(decimals=4)).numel() for im in s])
    if kind in ("stripes", "lines", "checkerboard"):  # two levels exactly
        assert int(distinct.max()) <= 2
    if kind == "noise":  # smooth fields: many levels
        assert float(distinct.double().median()) > 200


def test_patterns_differ_in_distribution_from_training_images():
    pool = _digits(512, 1, 28, seed=1)
    x = synthetic_outliers(pool, 512, _gen(14))
    half = _digits(512, 1, 28, seed=2)
    mean_x, mean_pool, mean_half = (t.flatten(1).mean(dim=1).numpy() for t in (x, pool, half))
    same = scipy.stats.ks_2samp(mean_pool, mean_half).statistic
    diff = scipy.stats.ks_2samp(mean_x, mean_pool).statistic
    assert same < 0.15
    assert diff > 0.6


def test_perlin_matches_reference_loop():
    g = _gen(15)
    lattice = 6
    angle = torch.rand(2, 1, lattice * lattice, generator=g) * 2 * math.pi
    grad = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)
    u = torch.rand(2, 1, 7, generator=g) * 4
    v = torch.rand(2, 5, 1, generator=g) * 4
    got = O._perlin(u, v, grad, lattice)

    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    ref = np.zeros((2, 5, 7))
    gn = grad.double().numpy()
    for p in range(2):
        for i in range(5):
            for j in range(7):
                px, py = float(u[p, 0, j]), float(v[p, i, 0])
                x0, y0 = math.floor(px), math.floor(py)
                dots = {}
                for dx in (0, 1):
                    for dy in (0, 1):
                        k = (y0 + dy) * lattice + (x0 + dx)
                        dots[dx, dy] = gn[p, 0, k] * (px - x0 - dx) + gn[p, 1, k] * (py - y0 - dy)
                sx, sy = fade(px - x0), fade(py - y0)
                top = dots[0, 0] + sx * (dots[1, 0] - dots[0, 0])
                bot = dots[0, 1] + sx * (dots[1, 1] - dots[0, 1])
                ref[p, i, j] = top + sy * (bot - top)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    # zero at lattice points, |noise| ≤ √2 / 2
    at_lattice = O._perlin(torch.arange(4.0).view(1, 1, 4).expand(2, 1, 4),
                           torch.arange(4.0).view(1, 4, 1).expand(2, 4, 1), grad, lattice)
    assert float(at_lattice.abs().max()) == 0.0
    assert float(got.abs().max()) <= math.sqrt(2) / 2


# ----------------------------------------------------------------------- geometry
def test_affine_theta_matches_rot90_and_affine_grid():
    x = torch.rand(3, 2, 8, 8, generator=_gen(16))
    theta = O._affine_theta(torch.full((3,), 90.0), torch.ones(3), torch.zeros(3),
                            torch.zeros(3, 2), torch.ones(3, 2), 8, 8)
    grid = O._map_grid(theta, O._base_grid(3, 8, 8, torch.device("cpu")))
    y = F.grid_sample(x, grid, mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)
    # flips are exact too
    theta = O._affine_theta(torch.zeros(2), torch.ones(2), torch.zeros(2), torch.zeros(2, 2),
                            torch.tensor([[-1.0, 1.0], [1.0, -1.0]]), 8, 8)
    grid = O._map_grid(theta, O._base_grid(2, 8, 8, torch.device("cpu")))
    y = F.grid_sample(x[:2], grid, mode="bilinear", align_corners=False)
    torch.testing.assert_close(y[0], x[0].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1], x[1].flip(-2), atol=1e-5, rtol=0)
    # the elementwise grid equals torch's affine_grid on a non-square image
    theta = O._affine_theta(torch.tensor([33.0, -70.0]), torch.tensor([1.2, 0.9]),
                            torch.tensor([10.0, -5.0]), torch.rand(2, 2, generator=_gen(17)),
                            torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), 8, 12)
    torch.testing.assert_close(
        O._map_grid(theta, O._base_grid(2, 8, 12, torch.device("cpu"))),
        F.affine_grid(theta, [2, 1, 8, 12], align_corners=False), atol=1e-6, rtol=0)


def test_homography_maps_the_four_points():
    src = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]).expand(3, 4, 2)
    dst = src * (1 - 0.6 * torch.rand(3, 4, 2, generator=_gen(18)))
    hom = O._homography(dst, src)
    pts = O._map_grid(hom.float(), dst.reshape(3, 1, 4, 2))
    torch.testing.assert_close(pts.reshape(3, 4, 2), src, atol=1e-5, rtol=0)
    # a projective map sends the midpoint of a side onto that side (straight lines stay)
    mid = (dst[:, 0] + dst[:, 1]) / 2
    on_side = O._map_grid(hom.float(), mid.view(3, 1, 1, 2)).view(3, 2)
    torch.testing.assert_close(on_side[:, 1], torch.full((3,), -1.0), atol=1e-5, rtol=0)


def test_gaussian_blur_matches_scipy():
    x = torch.rand(4, 3, 9, 11, generator=_gen(19), dtype=torch.float64)
    sigma = torch.tensor([0.3, 1.0, 2.0, 4.0], dtype=torch.float64)
    got = O._gaussian_blur(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        k = np.exp(-0.5 * (np.arange(-2, 3) / s) ** 2)
        k /= k.sum()
        ref = scipy.ndimage.correlate1d(x[i].numpy(), k, axis=-1, mode="mirror")
        ref = scipy.ndimage.correlate1d(ref, k, axis=-2, mode="mirror")
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-12)


# ----------------------------------------------------------------------- errors
@pytest.mark.parametrize(("field", "value"), [
    ("p_transformed", 1.5), ("p_noise", -0.1), ("p_rotate", True), ("p_blur", float("nan")),
    ("source_degrees", 200.0), ("perspective_distortion", 1.0), ("elastic_px", -1.0),
    ("noise_std", float("inf")), ("pattern_weights", (1.0, 1.0)),
    ("pattern_weights", (0.0,) * 6), ("pattern_weights", (1.0, -1.0, 1.0, 1.0, 1.0, 1.0)),
])
def test_bad_config_raises(field, value):
    with pytest.raises(UserError, match=field) as err:
        OutlierConfig(**{field: value})
    assert repr(value) in str(err.value)


@pytest.mark.parametrize(("images", "count", "needle"), [
    (torch.rand(4, 1, 28, 28), -1, "count"),
    (torch.rand(4, 1, 28, 28), 2.0, "count"),
    (torch.rand(1, 28, 28), 4, "(N, C, H, W)"),
    (torch.rand(4, 2, 28, 28), 4, "C in"),
    (torch.rand(4, 1, 4, 28), 4, "H, W >= 8"),
    (torch.zeros(4, 1, 28, 28, dtype=torch.uint8), 4, "floating"),
    (torch.rand(0, 1, 28, 28), 64, "empty"),
    (torch.randn(4, 1, 28, 28) * 3, 64, "raw pixels"),
])
def test_bad_inputs_raise(images, count, needle):
    with pytest.raises(UserError, match=needle):
        synthetic_outliers(images, count, _gen(0))


@pytest.mark.parametrize(("args", "needle"), [
    ((-1, 1, 28, 28), "count"), ((4, 0, 28, 28), "channels"), ((4, 1, 7, 28), "H"),
    ((4, 1, 28, 2.5), "W"),
])
def test_bad_pattern_arguments_raise(args, needle):
    with pytest.raises(UserError, match=needle):
        generated_patterns(*args, _gen(0))


def test_bad_generator_raises():
    with pytest.raises(UserError, match="torch.Generator"):
        synthetic_outliers(torch.rand(4, 1, 28, 28), 4, 0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- picture
@pytest.mark.parametrize(("c", "n", "columns", "title"), [(1, 20, 8, ""), (3, 6, 4, "RGB")])
def test_outlier_grid_writes_png(tmp_path, c, n, columns, title):
    h = 28 if c == 1 else 32
    x = synthetic_outliers(_digits(8, c, h), n, _gen(20))
    path = tmp_path / "grid.png"
    outlier_grid(x, path, columns=columns, title=title)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = plt.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    rows = math.ceil(n / columns)
    expected = (columns * (h + 1) + 1) / (rows * (h + 1) + 1)
    ratio = img.shape[1] / img.shape[0]
    tol = 0.1 if not title else 0.25  # a title adds a line of text on top
    assert abs(ratio / expected - 1) < tol
    assert not list(tmp_path.glob(".grid.png.*"))  # no temporary file left behind


def test_outlier_grid_bad_arguments(tmp_path):
    x = torch.rand(4, 1, 28, 28)
    with pytest.raises(UserError, match="columns"):
        outlier_grid(x, tmp_path / "g.png", columns=0)
    with pytest.raises(UserError, match="does not exist"):
        outlier_grid(x, tmp_path / "missing" / "g.png")
    with pytest.raises(UserError, match="at least one"):
        outlier_grid(x[:0], tmp_path / "g.png")
