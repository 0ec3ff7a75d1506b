"""Tests for diverse.math.kernels: closed-form gradients against autograd, matrix-product
sums against the materialized tensors, bandwidth heuristics against hand computations."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from diverse.math import kernels as kn

KernelFn = Callable[..., tuple[Tensor, Tensor]]

CASES: list[tuple[str, KernelFn, dict[str, float]]] = [
    ("rbf", kn.rbf, {}),
    ("laplace", kn.laplace, {}),
    ("imq", kn.imq, {}),
    ("imq", kn.imq, {"beta": -1.0}),
]
CASE_IDS = ["rbf", "laplace", "imq", "imq_beta-1"]


def _points(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _autograd_first_arg_grad(
    fn: KernelFn, x: Tensor, y: Tensor, h: kn.Bandwidth, kwargs: dict[str, float]
) -> Tensor:
    """grad[i, j] = ∇_{x_i} k(x_i, y_j), from the full Jacobian of K with respect to x."""
    jac = torch.autograd.functional.jacobian(lambda a: fn(a, y, h, **kwargs)[0], x)  # (M,N,M,D)
    m = x.shape[0]
    idx = torch.arange(m)
    return jac[idx, :, idx, :]  # (M, N, D)


# --------------------------------------------------------------------------- distances


def test_sq_dists_matches_brute_force_and_batches() -> None:
    x, y = _points(2, 7, 4, seed=1), _points(2, 5, 4, seed=2)
    brute = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(kn.sq_dists(x, y), brute, rtol=1e-12, atol=1e-12)
    self_sq = kn.sq_dists(x)
    assert torch.all(self_sq.diagonal(dim1=-2, dim2=-1) == 0)  # exact zeros
    assert torch.all(self_sq >= 0)
    torch.testing.assert_close(self_sq, self_sq.mT)


def test_sq_dists_centring_keeps_float32_accurate_far_from_origin() -> None:
    # weights far from the origin, close to each other: the naive ‖x‖² + ‖y‖² − 2x·y
    # in float32 loses the distances to cancellation; centring recovers them
    x64 = 1e3 + 0.1 * _points(6, 1000, seed=3)
    truth = ((x64[:, None] - x64[None]) ** 2).sum(-1)
    x32 = x64.float()
    ours = kn.sq_dists(x32).double()
    n = (x32 * x32).sum(-1)
    naive = (n[:, None] + n[None] - 2 * x32 @ x32.T).clamp_min(0).double()
    off = ~torch.eye(6, dtype=torch.bool)
    rel_ours = ((ours - truth)[off].abs() / truth[off]).max().item()
    rel_naive = ((naive - truth)[off].abs() / truth[off]).max().item()
    assert rel_ours < 1e-4, rel_ours  # measured 2.4e-5
    # measured 23.5 on one CPU, 1.0 (every distance cancelled to 0) on another
    assert rel_naive >= 0.5, rel_naive


def test_gram_of_leaves_equals_the_flattened_gram_in_blocks() -> None:
    # three leaves, one wide enough for the column-block path (n > 8192) with a remainder
    leaves = [_points(5, 3, 4, seed=4), _points(5, 9001, seed=5), _points(5, 7, seed=6)]
    flat = torch.cat([v.reshape(5, -1) for v in leaves], 1)
    torch.testing.assert_close(kn.gram(leaves, centre=False), flat @ flat.T,
                               rtol=1e-12, atol=1e-10)
    centred = flat - flat.mean(0)
    torch.testing.assert_close(kn.gram(leaves, centre=True), centred @ centred.T,
                               rtol=1e-12, atol=1e-10)
    sq = kn.sq_dists_from_gram(kn.gram(leaves))
    torch.testing.assert_close(sq, kn.sq_dists(flat), rtol=1e-11, atol=1e-9)
    assert torch.all(sq.diagonal() == 0)


def test_gram_recentres_concentrated_float32_particles() -> None:
    # the same far-from-origin, concentrated particles as above, split in two leaves:
    # the automatic choice centres them, so float32 distances stay accurate
    x64 = 1e3 + 0.1 * _points(6, 1000, seed=3)
    truth = ((x64[:, None] - x64[None]) ** 2).sum(-1)
    x32 = x64.float()
    sq = kn.sq_dists_from_gram(kn.gram([x32[:, :400], x32[:, 400:]]))
    off = ~torch.eye(6, dtype=torch.bool)
    rel = ((sq - truth)[off].abs() / truth[off]).max().item()
    assert rel < 1e-4, rel
    plain = kn.sq_dists_from_gram(kn.gram([x32[:, :400], x32[:, 400:]], centre=False))
    assert ((plain - truth)[off].abs() / truth[off]).max().item() > 0.5  # the guard matters


@pytest.mark.parametrize("name", ["rbf", "laplace", "imq"])
def test_grad_sum_operators_apply_the_materialized_sums(name: str) -> None:
    x = _points(6, 3, seed=8)
    h = kn.resolve_bandwidth(kn.median_heuristic, kn.sq_dists(x))
    k, w = kn.kernel_and_weights(name, kn.sq_dists(x), h)
    first_op, second_op = kn.grad_sum_operators(w)
    _, grad = kn.KERNELS[name](x, x, h)  # grad[i, j] = ∇_{x_i} k(x_i, x_j)
    torch.testing.assert_close(k, kn.KERNELS[name](x, x, h)[0])
    torch.testing.assert_close(first_op @ x, grad.sum(1))
    torch.testing.assert_close(second_op @ x, grad.sum(0))  # Σ_j ∇_{x_j} k(x_j, x_i)
    torch.testing.assert_close(first_op.sum(-1), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(second_op.sum(-1), torch.zeros(6, dtype=torch.float64))


# --------------------------------------------------------------------------- bandwidths


def test_median_heuristics_by_hand_even_count() -> None:
    # 1-D points 0, 1, 3, 7: the 16 squared distances sorted are
    # 0 0 0 0 1 1 4 4 | 9 9 16 16 36 36 49 49 -> lower median 4, true median 6.5
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    sq = kn.sq_dists(x)
    assert kn.median_heuristic(sq).shape == (1, 1)
    assert kn.median_heuristic(sq).item() == pytest.approx(4.0 / math.log(5))
    assert kn.median_heuristic_rde(sq).item() == pytest.approx(6.5 / math.log(5))
    assert kn.median_heuristic_stein(sq).item() == pytest.approx(2 * 6.5)
    # FoRDE: per column j, median over i of d²_ij (self-distance included), / log M
    cols = torch.tensor([(1 + 9) / 2, (1 + 4) / 2, (4 + 9) / 2, (16 + 36) / 2])
    h = kn.median_heuristic_forde(sq)
    assert h.shape == (1, 4)
    torch.testing.assert_close(h[0], cols.double() / math.log(4) + 1e-12)


def test_median_heuristics_by_hand_odd_count() -> None:
    # 0, 1, 3: entries 0 0 0 1 1 4 4 9 9 -> both medians are 1
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    sq = kn.sq_dists(x)
    assert kn.median_heuristic(sq).item() == pytest.approx(1.0 / math.log(4))
    assert kn.median_heuristic_rde(sq).item() == pytest.approx(1.0 / math.log(4))


def test_median_heuristic_rde_reproduces_reference_rbf() -> None:
    # ratschlab/repulsive_ensembles utils/kernel.py, re-derived: σ² = med/(2 log(M+1)),
    # K = exp(−d² / (2σ²)) with the true median of all M² entries
    x = _points(10, 3, seed=4)
    sq = kn.sq_dists(x)
    sigma2 = kn.median(sq) / (2 * math.log(10 + 1))
    reference = torch.exp(-sq / (2 * sigma2))
    k, _ = kn.rbf(x, x, kn.median_heuristic_rde)
    torch.testing.assert_close(k, reference, rtol=1e-12, atol=1e-12)


def test_median_matches_numpy_style_median() -> None:
    t = _points(3, 8, 5, seed=5)
    ours = kn.median(t, dim=(-2, -1))
    flat = t.flatten(1).sort(-1).values
    torch.testing.assert_close(ours, 0.5 * (flat[:, 19] + flat[:, 20]))
    assert kn.median(t, dim=1, keepdim=True).shape == (3, 1, 5)


def test_bandwidth_is_detached_and_batched() -> None:
    x = _points(4, 6, 2, seed=6).requires_grad_(True)
    sq = kn.sq_dists(x)
    for heuristic in (kn.median_heuristic, kn.median_heuristic_rde, kn.median_heuristic_stein):
        h = heuristic(sq)
        assert h.shape == (4, 1, 1)
        assert not h.requires_grad
    h = kn.median_heuristic_forde(sq)
    assert h.shape == (4, 1, 6)
    assert not h.requires_grad
    assert not kn.resolve_bandwidth(torch.tensor(2.0, requires_grad=True), sq).requires_grad
    with pytest.raises(ValueError, match="at least 2"):
        kn.median_heuristic_forde(torch.zeros(1, 1))


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize(("name", "fn", "kwargs"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("h", [0.7, kn.median_heuristic], ids=["fixed", "median"])
def test_closed_form_gradient_matches_autograd(
    name: str, fn: KernelFn, kwargs: dict[str, float], h: kn.Bandwidth
) -> None:
    x, y = _points(5, 3, seed=7), _points(4, 3, seed=8)
    k, grad = fn(x, y, h, **kwargs)
    assert k.shape == (5, 4) and grad.shape == (5, 4, 3)
    torch.testing.assert_close(
        grad, _autograd_first_arg_grad(fn, x, y, h, kwargs), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize(("name", "fn", "kwargs"), CASES, ids=CASE_IDS)
def test_identical_points_give_one_and_zero_gradient(
    name: str, fn: KernelFn, kwargs: dict[str, float]
) -> None:
    x = _points(6, 4, seed=9)
    k, grad = fn(x, x.clone(), 1.3, **kwargs)
    torch.testing.assert_close(k.diagonal(), torch.ones(6, dtype=torch.float64))
    assert torch.all(grad.diagonal(dim1=0, dim2=1) == 0)
    kk = kn.kernel_matrix(name, x, None, 1.3, **kwargs)
    torch.testing.assert_close(kk.diagonal(), torch.ones(6, dtype=torch.float64))


def test_kernel_values_by_hand() -> None:
    x = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # distance 5
    h = 2.0
    assert kn.rbf(x, y, h)[0].item() == pytest.approx(math.exp(-25 / 2))
    assert kn.laplace(x, y, h)[0].item() == pytest.approx(math.exp(-5 / 2))
    assert kn.imq(x, y, h)[0].item() == pytest.approx((1 + 25 / 2) ** -0.5)
    assert kn.imq(x, y, h, beta=-1.0)[0].item() == pytest.approx(1 / (1 + 25 / 2))


def test_laplace_autograd_through_kernel_is_finite_at_coincident_points() -> None:
    x = _points(4, 3, seed=10).requires_grad_(True)
    k = kn.kernel_matrix("laplace", x, None, 1.0)
    (g,) = torch.autograd.grad(k.sum(), x)
    assert torch.isfinite(g).all()
    k2, grad = kn.laplace(x, x, 1.0)
    (g2,) = torch.autograd.grad(k2.sum() + grad.sum(), x)
    assert torch.isfinite(g2).all()


@pytest.mark.parametrize(("name", "fn", "kwargs"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("h", [0.9, kn.median_heuristic], ids=["fixed", "median"])
def test_grad_sums_equal_materialized(
    name: str, fn: KernelFn, kwargs: dict[str, float], h: kn.Bandwidth
) -> None:
    x = _points(7, 5, seed=11)
    k_full, grad = fn(x, x, h, **kwargs)
    k, sum_first, sum_second = kn.kernel_grad_sums(name, x, h, **kwargs)
    torch.testing.assert_close(k, k_full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum_first, grad.sum(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum_second, grad.sum(0), rtol=1e-10, atol=1e-12)
    # symmetric kernel: Σ_j ∇_{x_j} k(x_j, x_i) = −Σ_j ∇_{x_i} k(x_i, x_j)
    torch.testing.assert_close(sum_second, -sum_first, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "fn", "kwargs"), CASES, ids=CASE_IDS)
def test_grad_sums_batched_with_forde_bandwidth(
    name: str, fn: KernelFn, kwargs: dict[str, float]
) -> None:
    # FoRDE layout: member embeddings (M, B, D) -> B kernels over M members, with a
    # per-column bandwidth h_jb, so K is not symmetric and the two sums differ
    emb = _points(6, 3, 4, seed=12)  # (M, B, D)
    x = emb.transpose(0, 1)  # (B, M, D)
    k, sum_first, sum_second = kn.kernel_grad_sums(name, x, kn.median_heuristic_forde, **kwargs)
    for b in range(3):
        h_b = kn.median_heuristic_forde(kn.sq_dists(x[b]))
        k_full, grad = fn(x[b], x[b], h_b, **kwargs)
        torch.testing.assert_close(k[b], k_full, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sum_first[b], grad.sum(1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sum_second[b], grad.sum(0), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(sum_second, -sum_first)


def test_grad_sums_first_matches_reference_autograd_recipe() -> None:
    # the RDE code: autograd.grad(K(W, W.detach()).sum(), W) = Σ_j ∇_{w_i} k(w_i, w_j)
    w = _points(8, 20, seed=13).requires_grad_(True)
    h = kn.median_heuristic(kn.sq_dists(w.detach()))
    k = torch.exp(-((w[:, None] - w.detach()[None]) ** 2).sum(-1) / h)
    (ref,) = torch.autograd.grad(k.sum(), w)
    _, sum_first, _ = kn.kernel_grad_sums("rbf", w.detach(), h)
    torch.testing.assert_close(sum_first, ref, rtol=1e-10, atol=1e-12)


def test_grad_sums_large_dimension_float32() -> None:
    # many "weights", far from the origin: sums by matrix products stay accurate
    x64 = 5.0 + 0.05 * _points(5, 200_000, seed=14)
    _, f64, s64 = kn.kernel_grad_sums("rbf", x64, kn.median_heuristic)
    _, f32, s32 = kn.kernel_grad_sums("rbf", x64.float(), kn.median_heuristic)
    rel_first = ((f32.double() - f64).norm() / f64.norm()).item()
    rel_second = ((s32.double() - s64).norm() / s64.norm()).item()
    assert rel_first < 1e-4, rel_first  # measured 2.9e-6
    assert rel_second < 1e-4, rel_second  # measured 2.9e-6


def test_unknown_kernel_name() -> None:
    with pytest.raises(ValueError, match="unknown kernel"):
        kn.kernel_grad_sums("cosine", _points(3, 2), 1.0)
    assert set(kn.KERNELS) == {"rbf", "laplace", "imq"}


def test_median_heuristics_never_return_zero_for_two_or_coinciding_particles():
    from diverse.math.kernels import median_heuristic, median_heuristic_rde, median_heuristic_stein

    two = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)  # d² = 25
    sq = kn.sq_dists(two)
    assert median_heuristic(sq).item() == pytest.approx(25 / math.log(3))  # lower median is 0
    assert median_heuristic_rde(sq).item() == pytest.approx(12.5 / math.log(3))
    same = torch.zeros(3, 2, dtype=torch.float64)
    for heuristic in (median_heuristic, median_heuristic_rde, median_heuristic_stein):
        assert heuristic(kn.sq_dists(same)).item() > 0
