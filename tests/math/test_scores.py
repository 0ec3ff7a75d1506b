"""Tests for diverse.math.scores: every estimator against the exact score of Gaussians.

Settings used below (and why):

* KDE with its default, the narrow SVGD-style bandwidth ``h = med(d²)/log(M+1)``
  (the RDE code's). A wide bandwidth over-smooths it: with ``h = 2 med(d²)`` its
  relative error is ~1.5.
* SGE/SSGE with the Stein codes' bandwidth ``h = 2 med(d²)``
  (:func:`diverse.math.kernels.median_heuristic_stein`) and ``η = 1`` (SGE; the value of
  Shi et al.'s toy) or ``η = 0.1`` (SSGE). With the RDE code's defaults (narrow
  bandwidth, ``η = 0.01``) they are far noisier than the KDE —
  :func:`test_rde_defaults_make_stein_estimators_noisy` pins that down.

Errors are reported as the relative L2 error ``‖ĝ − g‖ / ‖g‖`` over all particles
and the mean per-particle cosine similarity; the numbers in the comments were
measured with the fixed seeds used here (float64, torch 2.13 CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from diverse.math import kernels as kn
from diverse.math import scores as sc

STEIN_H = kn.median_heuristic_stein


def _gaussian(m: int, d: int, seed: int) -> tuple[Tensor, Tensor]:
    """``m`` samples of N(μ, Σ) with Σ = Q diag(logspace(0, 1, d)) Qᵀ (condition 10),
    a random rotation Q and μ ~ 2·N(0, I); returns (samples, exact score −Σ⁻¹(x − μ))."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    cov = q @ torch.diag(torch.logspace(0, 1, d, dtype=torch.float64)) @ q.T
    mu = 2 * torch.randn(d, generator=g, dtype=torch.float64)
    x = mu + torch.randn(m, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return x, -torch.linalg.solve(cov, (x - mu).T).T


def _rel(est: Tensor, ref: Tensor) -> float:
    return ((est - ref).norm() / ref.norm()).item()


def _cos(est: Tensor, ref: Tensor) -> float:
    return torch.nn.functional.cosine_similarity(est, ref, dim=-1).mean().item()


def _sym_rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / (0.5 * (a.norm() + b.norm()))).item()


ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "kde": lambda x: sc.kde_score(x),
    "sge": lambda x: sc.sge_score(x, STEIN_H, eta=1.0),
    "ssge": lambda x: sc.ssge_score(x, STEIN_H, eta=0.1),
    "ssge_ratio": lambda x: sc.ssge_score(x, STEIN_H, eta=0.0, eigen_ratio=0.99),
}

# (rel-error bound, cosine bound) per estimator, M = 300, seed 0.
# measured rel / cos:        D=2            D=3            D=5
#   kde                 0.565 / 0.922  0.586 / 0.937  0.695 / 0.925
#   sge  (η=1)          0.272 / 0.964  0.255 / 0.973  0.289 / 0.981
#   ssge (η=0.1)        0.312 / 0.943  0.287 / 0.964  0.307 / 0.975
#   ssge (ratio 0.99)   0.280 / 0.962  0.300 / 0.969  0.340 / 0.967
BOUNDS: dict[str, tuple[float, float]] = {
    "kde": (0.75, 0.90),
    "sge": (0.35, 0.95),
    "ssge": (0.35, 0.93),
    "ssge_ratio": (0.40, 0.95),
}


@pytest.mark.parametrize("d", [2, 3, 5])
def test_estimators_recover_gaussian_score(d: int) -> None:
    x, true = _gaussian(300, d, seed=0)
    errors = {}
    for name, estimator in ESTIMATORS.items():
        est = estimator(x)
        assert est.shape == x.shape
        rel, cos = _rel(est, true), _cos(est, true)
        max_rel, min_cos = BOUNDS[name]
        assert rel < max_rel, (name, rel)
        assert cos > min_cos, (name, cos)
        errors[name] = rel
    # the Stein estimators beat the KDE, whose kernel smoothing shrinks the score
    # towards 0 (−(Σ + h/2·I)⁻¹(x − μ)): measured ratios 0.44–0.55
    for name in ("sge", "ssge", "ssge_ratio"):
        assert errors[name] < 0.7 * errors["kde"], (name, errors)


def test_rde_defaults_make_stein_estimators_noisy() -> None:
    # With the RDE code's settings (h = med/log(M+1), η = 0.01) SGE and SSGE still
    # point the right way but are much worse than KDE with the same bandwidth:
    # measured at D = 2, M = 300: rel 1.60 / 1.35 (cos 0.42 / 0.49) vs KDE 0.57 (0.92).
    x, true = _gaussian(300, 2, seed=0)
    kde = sc.kde_score(x)
    for est in (sc.sge_score(x), sc.ssge_score(x)):
        assert _cos(est, true) > 0.3
        assert _rel(est, true) > 2 * _rel(kde, true)


def test_standard_normal_1d_score_is_minus_x_in_the_bulk() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 1, generator=g, dtype=torch.float64)
    bulk = x.abs() < 1.5
    grid = torch.linspace(-1.5, 1.5, 31, dtype=torch.float64).unsqueeze(-1)
    # measured max / mean |ĝ + x| over the bulk (slope): KDE 0.30 / 0.13 (−0.94),
    # SGE 0.17 / 0.07 (−1.04), SSGE 0.22 / 0.11 (−1.04), SSGE on the grid 0.23 / 0.11 (−1.03)
    cases = {
        "kde": (sc.kde_score(x), x, bulk),
        "sge": (sc.sge_score(x, STEIN_H, eta=1.0), x, bulk),
        "ssge": (sc.ssge_score(x, STEIN_H, eta=0.1), x, bulk),
        "ssge_grid": (sc.ssge_score(x, STEIN_H, eta=0.1, y=grid), grid, torch.ones_like(grid) > 0),
    }
    for name, (est, pts, mask) in cases.items():
        err = (est + pts)[mask].abs()
        assert err.max().item() < 0.4, (name, err.max().item())
        assert err.mean().item() < 0.2, (name, err.mean().item())
        # least-squares slope of ĝ against x in the bulk ≈ −1 (KDE: −1/(1 + h/2))
        p, e = pts[mask], est[mask]
        slope = ((p * e).sum() / (p * p).sum()).item()
        assert -1.1 < slope < -0.85, (name, slope)


def test_estimators_agree_more_as_m_grows() -> None:
    # symmetric relative differences averaged over 4 seeds, D = 2:
    #                 M = 50   M = 400
    #   kde–sge       0.607    0.586   (KDE's bias shrinks only like 1/log M)
    #   kde–ssge      0.864    0.639
    #   sge–ssge      0.350    0.099
    def mean_diffs(m: int) -> dict[str, float]:
        out = {"kde-sge": 0.0, "kde-ssge": 0.0, "sge-ssge": 0.0}
        for seed in range(4):
            x, _ = _gaussian(m, 2, seed=100 + seed)
            a, b, c = (ESTIMATORS[n](x) for n in ("kde", "sge", "ssge"))
            out["kde-sge"] += _sym_rel(a, b) / 4
            out["kde-ssge"] += _sym_rel(a, c) / 4
            out["sge-ssge"] += _sym_rel(b, c) / 4
        return out

    small, large = mean_diffs(50), mean_diffs(400)
    for pair in small:
        assert large[pair] < small[pair], (pair, small, large)
    assert large["sge-ssge"] < 0.5 * small["sge-ssge"], (small, large)
    assert large["kde-ssge"] < 0.85 * small["kde-ssge"], (small, large)


# --------------------------------------------------------------------------- conventions


def test_sge_sign_matches_reference_code_form() -> None:
    # RDE code: solve(K + ηI, autograd.grad(K(W, W.detach()).sum(), W)) — the Stein
    # identity form −(Kᵀ + ηI)⁻¹ Σ_j ∇_{x_j} k(x_j, x_i) is the same for a symmetric K
    w = torch.randn(9, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = w.requires_grad_(True)
    h = kn.median_heuristic(kn.sq_dists(w.detach()))
    k = torch.exp(-((w[:, None] - w.detach()[None]) ** 2).sum(-1) / h)
    (grad_k,) = torch.autograd.grad(k.sum(), w)
    ref = torch.linalg.solve(k.detach() + 0.01 * torch.eye(9, dtype=torch.float64), grad_k)
    torch.testing.assert_close(sc.sge_score(w.detach(), h, eta=0.01), ref, rtol=1e-9, atol=1e-12)


def test_kde_score_matches_autograd_of_log_kde() -> None:
    # g_i = ∇_x log Σ_j k(x, x_j) at x = x_i, centres held fixed; also with FoRDE's
    # batched per-column bandwidth (the gradient FoRDE's repulsion loss differentiates)
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for kernel in ("rbf", "laplace", "imq"):
        for h in (kn.median_heuristic, kn.median_heuristic_forde):
            xr = x.clone().requires_grad_(True)
            k = kn.KERNELS[kernel](xr, x, kn.resolve_bandwidth(h, kn.sq_dists(x)))[0]
            (ref,) = torch.autograd.grad(k.sum(-1).log().sum(), xr)
            torch.testing.assert_close(sc.kde_score(x, h, kernel=kernel), ref)


def test_ssge_equals_sge_without_ridge_and_truncation() -> None:
    # all eigenvalues and η = 0: −K U Λ⁻² Uᵀ ∇K = −K⁻¹ ∇K (cond(K) ≈ 30 here)
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(sc.ssge_score(x, eta=0.0), sc.sge_score(x, eta=0.0))


def test_ssge_options() -> None:
    x, _ = _gaussian(40, 3, seed=4)
    full = sc.ssge_score(x, STEIN_H, eta=0.1)
    torch.testing.assert_close(sc.ssge_score(x, STEIN_H, eta=0.1, num_eigen=40), full)
    torch.testing.assert_close(sc.ssge_score(x, STEIN_H, eta=0.1, eigen_ratio=1.0), full)
    torch.testing.assert_close(sc.ssge_score(x, STEIN_H, eta=0.1, y=x), full)
    few = sc.ssge_score(x, STEIN_H, eta=0.1, num_eigen=3)
    assert not torch.allclose(few, full)
    # a per-column (asymmetric) bandwidth has no symmetric eigendecomposition
    with pytest.raises(ValueError, match="one bandwidth per kernel matrix"):
        sc.ssge_score(x, kn.median_heuristic_forde)


@pytest.mark.parametrize("name", ["kde", "sge", "ssge"])
def test_batched_equals_looped_and_float32_close(name: str) -> None:
    fn = sc.SCORE_ESTIMATORS[name]
    x = torch.randn(3, 30, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    batched = fn(x)
    for b in range(3):
        torch.testing.assert_close(batched[b], fn(x[b]))
    # float32 inputs: M × M algebra in float64, then one float32 product
    # (measured relative differences 3e-7 .. 4e-6)
    rel = _rel(fn(x.float()).double(), batched)
    assert rel < 1e-4, rel
