"""MMD U-statistic, bandwidth grid, aggregate and permutation null (seed 004)."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from diverse.errors import UserError
from diverse.math.mmd import bandwidth_grid, mmd, mmd2_unbiased, mmd_null_spread, pooled_distances


def _gaussians(seed, n, m, d, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64)
    y[:, 0] += shift
    return x, y


def _loop_mmd2(x, y, kernel, h):
    """Direct double loops over the three sums of Gretton et al. (2012), Lemma 6."""
    x, y = x.numpy(), y.numpy()

    def k(a, b):
        if kernel == "gaussian":
            return math.exp(-np.sum((a - b) ** 2) / h**2)
        return math.exp(-np.sum(np.abs(a - b)) / h)

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("kernel", ["gaussian", "laplace"])
@pytest.mark.parametrize("h", [0.3, 1.0, 4.0])
def test_u_statistic_matches_loops(kernel, h):
    x, y = _gaussians(0, 6, 9, 3, shift=0.7)
    got = mmd2_unbiased(x, y, kernel, h).item()
    assert got == pytest.approx(_loop_mmd2(x, y, kernel, h), rel=1e-10, abs=1e-12)


def test_pooled_distances_match_scipy():
    x, y = _gaussians(1, 5, 4, 3)
    z = torch.cat([x, y]).numpy()
    for p, metric in ((2, "euclidean"), (1, "cityblock")):
        d = pooled_distances(x + 100.0, y + 100.0, p).numpy()  # far from the origin
        ref = np.zeros((9, 9))
        ref[np.triu_indices(9, 1)] = pdist(z, metric)
        np.testing.assert_allclose(d, ref + ref.T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("p", "metric"), [(2, "euclidean"), (1, "cityblock")])
def test_bandwidth_grid_geometric_from_half_min_to_twice_max(p, metric):
    x, y = _gaussians(2, 7, 5, 4)
    y[0] = x[0]  # a duplicate: its zero distance must be skipped
    grid = bandwidth_grid(x, y, count=10, p=p).numpy()
    dist = pdist(torch.cat([x, y]).numpy(), metric)
    dist = dist[dist > 0]
    np.testing.assert_allclose(grid, np.geomspace(dist.min() / 2, dist.max() * 2, 10), rtol=1e-9)
    ratios = grid[1:] / grid[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
    assert ratios[0] ** 9 == pytest.approx(4 * dist.max() / dist.min(), rel=1e-9)


def test_mmd_grid_and_mean_aggregate():
    x, y = _gaussians(3, 8, 11, 3, shift=0.5)
    out = mmd(x, y, count=5)
    assert set(out) == {"gaussian", "gaussian_bandwidth", "laplace", "laplace_bandwidth",
                        "aggregate"}
    for kernel, p in (("gaussian", 2), ("laplace", 1)):
        np.testing.assert_allclose(out[f"{kernel}_bandwidth"], bandwidth_grid(x, y, 5, p=p))
        direct = torch.stack([mmd2_unbiased(x, y, kernel, h) for h in out[f"{kernel}_bandwidth"]])
        np.testing.assert_allclose(out[kernel], direct, rtol=1e-10, atol=1e-12)
    every = torch.cat([out["gaussian"], out["laplace"]])
    assert out["aggregate"].item() == pytest.approx(every.mean().item(), rel=1e-12)
    worst = mmd(x, y, count=5, aggregate="max")["aggregate"]
    assert worst.item() == pytest.approx(every.max().item(), rel=1e-12)
    only = mmd(x, y, kernels=("laplace",), count=5)
    assert set(only) == {"laplace", "laplace_bandwidth", "aggregate"}
    assert only["aggregate"].item() == pytest.approx(out["laplace"].mean().item(), rel=1e-12)


def test_gaussian_kernel_matches_closed_form():
    """x ~ N(0, s²I), y ~ N(δ, s²I), k = exp(−‖x−y‖²/h²):
    MMD² = 2 (1 + 4s²/h²)^(−D/2) (1 − exp(−‖δ‖²/(h² + 4s²))).

    The U-statistic is unbiased at every n, so many small draws pin its mean down
    cheaply (cost n² per draw, variance 1/(n·draws))."""
    s, h, dim, n, draws = 1.0, 1.5, 2, 100, 600
    delta = torch.tensor([1.0, 0.5], dtype=torch.float64)
    exact = 2 * (1 + 4 * s**2 / h**2) ** (-dim / 2) * (
        1 - math.exp(-delta.square().sum().item() / (h**2 + 4 * s**2))
    )
    # by hand: 2 · (1 + 4/2.25)⁻¹ · (1 − e^(−1.25/6.25)) = 2 · 0.36 · 0.181269 = 0.130514
    assert exact == pytest.approx(0.130514, abs=1e-6)
    g = torch.Generator().manual_seed(4)
    values = []
    for _ in range(draws):
        x = s * torch.randn(n, dim, generator=g, dtype=torch.float64)
        y = delta + s * torch.randn(n, dim, generator=g, dtype=torch.float64)
        values.append(mmd2_unbiased(x, y, "gaussian", h).item())
    se = np.std(values, ddof=1) / math.sqrt(draws)
    assert se < 0.002  # fine enough to tell h from the h·√2 convention (0.1449)
    assert np.mean(values) == pytest.approx(exact, abs=4 * se)


def test_unbiased_under_the_null():
    """Average of MMD²_u over independent same-distribution draws ≈ 0; the biased
    V-statistic (diagonal included) has a clearly positive mean on the same draws."""
    n, h, draws = 10, 2.0, 300
    values, biased = [], []
    for seed in range(draws):
        x, y = _gaussians(100 + seed, n, n, 2)
        u = mmd2_unbiased(x, y, "gaussian", h).item()
        values.append(u)
        # V-statistic: add the diagonal terms k(x_i, x_i) = 1 back in.
        kxx = torch.exp(-torch.cdist(x, x).square() / h**2).sum().item()
        kyy = torch.exp(-torch.cdist(y, y).square() / h**2).sum().item()
        kxy = torch.exp(-torch.cdist(x, y).square() / h**2).mean().item()
        biased.append(kxx / n**2 + kyy / n**2 - 2 * kxy)
    values = np.array(values)
    se = values.std(ddof=1) / math.sqrt(draws)
    assert abs(values.mean()) < 3.5 * se
    assert np.mean(biased) > 10 * se


def test_same_distribution_within_null_spread():
    x, y = _gaussians(5, 40, 30, 5)
    observed = mmd(x, y)["aggregate"].item()
    null = mmd_null_spread(x, y, 300, torch.Generator().manual_seed(0))
    assert null.shape == (300,)
    assert abs(observed) < torch.quantile(null, 0.95).item()
    assert abs(null.mean().item()) < 3 * null.std().item() / math.sqrt(300) + 1e-3


def test_shifted_mean_above_null_max():
    x, y = _gaussians(6, 40, 30, 5, shift=1.5)
    observed = mmd(x, y)["aggregate"].item()
    null = mmd_null_spread(x, y, 200, torch.Generator().manual_seed(1))
    assert observed > 0
    assert observed > null.max().item()


def test_null_values_are_relabelled_statistics():
    """With n = m = 3 there are 20 labelings; every null draw must be one of them, and
    the draws reproduce under the same generator seed."""
    x, y = _gaussians(7, 3, 3, 2, shift=1.0)
    z = torch.cat([x, y])
    exact = []
    for idx in itertools.combinations(range(6), 3):
        rest = [i for i in range(6) if i not in idx]
        exact.append(mmd(z[list(idx)], z[rest], count=4)["aggregate"].item())
    exact = np.array(exact)
    null = mmd_null_spread(x, y, 50, torch.Generator().manual_seed(2), count=4).numpy()
    assert np.abs(null[:, None] - exact[None, :]).min(axis=1).max() < 1e-12
    assert len(np.unique(np.round(null, 10))) > 5  # several different labelings drawn
    again = mmd_null_spread(x, y, 50, torch.Generator().manual_seed(2), count=4).numpy()
    np.testing.assert_array_equal(null, again)


def test_bad_input_raises_user_error():
    x, y = _gaussians(8, 5, 5, 3)
    with pytest.raises(UserError, match="kernel 'rbf'"):
        mmd2_unbiased(x, y, "rbf", 1.0)
    with pytest.raises(UserError, match="bandwidth"):
        mmd2_unbiased(x, y, "gaussian", 0.0)
    with pytest.raises(UserError, match="at least 2 points"):
        mmd2_unbiased(x[:1], y, "gaussian", 1.0)
    with pytest.raises(UserError, match="one dimension"):
        mmd(x, y[:, :2])
    with pytest.raises(UserError, match="count"):
        bandwidth_grid(x, y, count=1)
    with pytest.raises(UserError, match="aggregate 'median'"):
        mmd(x, y, aggregate="median")
    with pytest.raises(UserError, match="coincide"):
        bandwidth_grid(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(UserError, match="permutations"):
        mmd_null_spread(x, y, 0, torch.Generator())
