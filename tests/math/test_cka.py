"""Tests for diverse.math.cka: Gram matrices, centering, HSIC and CKA against float64 NumPy
references written with loops and textbook formulas, CKA invariances, the unbiased
estimator's (lack of) bias, and the unit-sphere embedding used by HE-CKA."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import Tensor

from diverse.errors import UserError
from diverse.math import cka


def _randn(*shape: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- NumPy oracles


def np_sq_dists(f: np.ndarray) -> np.ndarray:
    n = f.shape[0]
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d[i, j] = float(np.sum((f[i] - f[j]) ** 2))
    return d


def np_gram(f: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return f @ f.T
    if kind == "cosine":
        u = f / np.linalg.norm(f, axis=1, keepdims=True)
        return u @ u.T
    d = np_sq_dists(f)
    n = f.shape[0]
    pairs = [d[i, j] for i in range(n) for j in range(i + 1, n)]
    h2 = np.median(pairs) / 2.0
    return np.exp(-d / (2.0 * h2))


def np_hsic_biased(k: np.ndarray, l: np.ndarray) -> np.ndarray:
    """V-statistic (1/n²)Σ k_ij l_ij + (1/n⁴)Σ k_ij Σ l_qr − (2/n³)Σ k_ij l_iq, rescaled
    by n²/(n−1)² to the tr(KHLH)/(n−1)² convention."""
    n = k.shape[0]
    a = sum(k[i, j] * l[i, j] for i in range(n) for j in range(n)) / n**2
    b = k.sum() * l.sum() / n**4
    c = sum(k[i, j] * l[i, q] for i in range(n) for j in range(n) for q in range(n)) / n**3
    return (a + b - 2.0 * c) * n**2 / (n - 1) ** 2


def np_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """U-statistic over distinct index tuples (Song et al. 2012, Theorem 2)."""
    n = k.shape[0]
    idx = range(n)
    p2 = list(itertools.permutations(idx, 2))
    p3 = list(itertools.permutations(idx, 3))
    p4 = list(itertools.permutations(idx, 4))
    a = sum(k[i, j] * l[i, j] for i, j in p2) / len(p2)
    b = sum(k[i, j] * l[q, r] for i, j, q, r in p4) / len(p4)
    c = sum(k[i, j] * l[i, q] for i, j, q in p3) / len(p3)
    return a + b - 2.0 * c


def np_cka(k: np.ndarray, l: np.ndarray, hsic) -> float:
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


# --------------------------------------------------------------------------- as_matrix


def test_as_matrix_flattens_everything_after_batch_axis():
    x = _randn(3, 4, 2, 5, 5)
    out = cka.as_matrix(x)
    assert out.shape == (3, 4, 50)
    torch.testing.assert_close(out[1, 2], x[1, 2].flatten())
    assert cka.as_matrix(_randn(3, 4)).shape == (3, 4, 1)
    assert cka.as_matrix(_randn(2, 3, 4, 5, 6), leading=2).shape == (2, 3, 4, 30)
    with pytest.raises(UserError, match="batch axis"):
        cka.as_matrix(_randn(3))


# --------------------------------------------------------------------------- Gram matrices


@pytest.mark.parametrize("kind", ["linear", "cosine", "rbf"])
def test_gram_matches_numpy_and_batches_over_members(kind):
    f = _randn(3, 7, 4, seed=1)
    k = cka.gram(f, kind)
    assert k.shape == (3, 7, 7)
    for m in range(3):
        np.testing.assert_allclose(
            k[m].numpy(), np_gram(f[m].numpy(), kind), rtol=1e-10, atol=1e-12
        )


def test_rbf_bandwidth_is_half_the_median_off_diagonal_squared_distance():
    f = _randn(2, 6, 3, seed=2)  # 15 pairs: odd count, median is the 8th value
    sq = torch.stack([torch.from_numpy(np_sq_dists(f[m].numpy())) for m in range(2)])
    h2 = cka.rbf_bandwidth(sq)
    assert h2.shape == (2, 1, 1)
    for m in range(2):
        d = np_sq_dists(f[m].numpy())
        pairs = sorted(d[i, j] for i in range(6) for j in range(i + 1, 6))
        assert h2[m, 0, 0].item() == pytest.approx(pairs[7] / 2.0, rel=1e-12)
    # even number of pairs (B = 5: 10 pairs): the true median, mean of the middle two
    d = np_sq_dists(f[0, :5].numpy())
    pairs = sorted(d[i, j] for i in range(5) for j in range(i + 1, 5))
    h2 = cka.rbf_bandwidth(torch.from_numpy(d))
    assert h2.item() == pytest.approx((pairs[4] + pairs[5]) / 4.0, rel=1e-12)


def test_rbf_bandwidth_falls_back_to_one_for_coinciding_examples():
    f = torch.zeros(1, 5, 3, dtype=torch.float64)
    f[0, 0, 0] = 2.0  # four examples coincide: median squared distance 0
    sq = torch.from_numpy(np_sq_dists(f[0].numpy()))
    assert cka.rbf_bandwidth(sq).item() == 1.0
    k = cka.gram(f, "rbf")[0]
    assert k[0, 1].item() == pytest.approx(np.exp(-4.0 / 2.0), rel=1e-12)
    assert torch.isfinite(k).all()


def test_cosine_gram_of_zero_row_is_finite():
    f = _randn(1, 4, 3, seed=3)
    f[0, 2] = 0.0
    k = cka.gram(f, "cosine")[0]
    assert torch.isfinite(k).all()
    assert k[2].abs().max().item() == 0.0
    assert k[0, 0].item() == pytest.approx(1.0, abs=1e-10)


# --------------------------------------------------------------------------- centering


def test_standard_centering_is_HKH_and_one_sided_is_KH():
    f = _randn(2, 6, 3, seed=4)
    k = cka.gram(f)
    n = 6
    h = np.eye(n) - np.ones((n, n)) / n
    for m in range(2):
        km = k[m].numpy()
        np.testing.assert_allclose(cka.center(k, "standard")[m].numpy(), h @ km @ h, atol=1e-12)
        np.testing.assert_allclose(cka.center(k, "one-sided")[m].numpy(), km @ h, atol=1e-12)
        # one-sided: each row has its own mean subtracted
        np.testing.assert_allclose(
            cka.center(k, "one-sided")[m].numpy(), km - km.mean(1, keepdims=True), atol=1e-12
        )
    diff = (cka.center(k, "standard") - cka.center(k, "one-sided")).abs().max().item()
    assert diff > 0.1
    # and the cosines of the two centered forms differ: only the standard one is CKA
    u_std = cka.unit_grams(f, centering="standard")
    u_one = cka.unit_grams(f, centering="one-sided")
    assert abs((u_std[0] @ u_std[1]).item() - (u_one[0] @ u_one[1]).item()) > 1e-3


# --------------------------------------------------------------------------- HSIC and CKA


@pytest.mark.parametrize("kind", ["linear", "cosine", "rbf"])
def test_hsic_and_cka_match_numpy_loops(kind):
    x, y = _randn(6, 3, seed=5), _randn(6, 4, seed=6)
    x_, y_ = x.numpy(), y.numpy()
    k, l = cka.gram(x, kind), cka.gram(y, kind)
    kn, ln = np_gram(x_, kind), np_gram(y_, kind)
    assert cka.hsic(k, l).item() == pytest.approx(np_hsic_biased(kn, ln), rel=1e-6, abs=1e-10)
    assert cka.hsic(k, l, "unbiased").item() == pytest.approx(
        np_hsic_unbiased(kn, ln), rel=1e-6, abs=1e-10
    )
    assert cka.cka(k, l).item() == pytest.approx(np_cka(kn, ln, np_hsic_biased), rel=1e-6)
    assert cka.cka(k, l, "unbiased").item() == pytest.approx(
        np_cka(kn, ln, np_hsic_unbiased), rel=1e-6
    )


def test_hsic_broadcasts_over_leading_dims():
    k = cka.gram(_randn(3, 5, 2, seed=7))
    l = cka.gram(_randn(5, 2, seed=8))
    for est in ("biased", "unbiased"):
        out = cka.hsic(k, l, est)
        assert out.shape == (3,)
        for m in range(3):
            assert out[m].item() == pytest.approx(cka.hsic(k[m], l, est).item(), rel=1e-12)


def test_cka_invariances_linear():
    x = _randn(10, 4, seed=9)
    q, _ = torch.linalg.qr(_randn(4, 4, seed=10))
    kx = cka.gram(x)
    for est in ("biased", "unbiased"):
        assert cka.cka(kx, cka.gram(x @ q), est).item() == pytest.approx(1.0, abs=1e-10)
        assert cka.cka(kx, cka.gram(3.7 * x), est).item() == pytest.approx(1.0, abs=1e-10)
    # and a different representation is not similar
    assert cka.cka(kx, cka.gram(_randn(10, 4, seed=11))).item() < 0.9


@pytest.mark.parametrize("kind", ["linear", "cosine", "rbf"])
@pytest.mark.parametrize("est", ["biased", "unbiased"])
def test_cka_of_representation_with_itself_is_one(kind, est):
    k = cka.gram(_randn(9, 3, seed=12), kind)
    assert cka.cka(k, k, est).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine", "rbf"])
@pytest.mark.parametrize("est", ["biased", "unbiased"])
def test_cka_matrix_is_symmetric_unit_diagonal_and_matches_pairwise_cka(kind, est):
    f = _randn(4, 8, 3, seed=13)
    c = cka.cka_matrix(f, kind, est)
    assert c.shape == (4, 4)
    torch.testing.assert_close(c, c.mT, rtol=0, atol=1e-12)
    torch.testing.assert_close(c.diagonal(), torch.ones(4, dtype=torch.float64))
    k = cka.gram(f, kind)
    for m, n in itertools.product(range(4), repeat=2):
        assert c[m, n].item() == pytest.approx(cka.cka(k[m], k[n], est).item(), rel=1e-10)
    # cross-check one pair against NumPy
    ref = np_cka(
        np_gram(f[0].numpy(), kind),
        np_gram(f[2].numpy(), kind),
        np_hsic_biased if est == "biased" else np_hsic_unbiased,
    )
    assert c[0, 2].item() == pytest.approx(ref, rel=1e-6)


def test_unbiased_hsic_is_unbiased_for_independent_features():
    """E[HSIC_u] = 0 for independent X, Y; the biased estimator is clearly positive."""
    draws, b, p = 2000, 8, 3
    x, y = _randn(draws, b, p, seed=14), _randn(draws, b, p, seed=15)
    k, l = cka.gram(x), cka.gram(y)
    hb, hu = cka.hsic(k, l), cka.hsic(k, l, "unbiased")
    se_b = hb.std().item() / draws**0.5
    se_u = hu.std().item() / draws**0.5
    assert hb.mean().item() > 30 * se_b  # biased: far from 0
    assert abs(hu.mean().item()) < 3 * se_u  # unbiased: 0 within noise
    assert abs(hu.mean().item()) < 0.05 * hb.mean().item()


def test_estimator_input_errors():
    k = cka.gram(_randn(3, 2, seed=16))
    with pytest.raises(UserError, match="'median'.*biased, unbiased"):
        cka.hsic(k, k, "median")
    with pytest.raises(UserError, match="at least 4"):
        cka.hsic(k, k, "unbiased")
    with pytest.raises(UserError, match="'poly'.*linear, cosine, rbf"):
        cka.gram(_randn(3, 2), "poly")
    with pytest.raises(UserError, match="'two-sided'.*standard, one-sided"):
        cka.center(k, "two-sided")
    with pytest.raises(UserError, match=r"\(M, B, P\)"):
        cka.cka_matrix(_randn(2, 3, 4, 5))


# --------------------------------------------------------------------------- unit grams


@pytest.mark.parametrize("kind", ["linear", "cosine", "rbf"])
def test_unit_gram_inner_products_are_biased_cka(kind):
    f = _randn(5, 7, 3, seed=17)
    u = cka.unit_grams(f, kind)
    assert u.shape == (5, 49)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(u @ u.mT, cka.cka_matrix(f, kind), rtol=0, atol=1e-12)


def test_unit_grams_detach_diagonal_keeps_values_and_drops_diagonal_gradient():
    """With the diagonal detached, the gradient equals the finite-difference gradient of
    the same function with the Gram's diagonal frozen at its starting value."""
    f0 = _randn(2, 4, 2, seed=18)
    k0 = cka.gram(f0).detach()
    u_det = cka.unit_grams(f0, detach_diagonal=True)
    u_full = cka.unit_grams(f0, detach_diagonal=False)
    torch.testing.assert_close(u_det, u_full, rtol=0, atol=0)

    def frozen_cos(f: np.ndarray) -> float:
        n = f.shape[1]
        h = np.eye(n) - np.ones((n, n)) / n
        vs = []
        for m in range(2):
            km = f[m] @ f[m].T
            np.fill_diagonal(km, np.diag(k0[m].numpy()))
            v = (h @ km @ h).ravel()
            vs.append(v / np.linalg.norm(v))
        return float(vs[0] @ vs[1])

    f = f0.clone().requires_grad_()
    u = cka.unit_grams(f, detach_diagonal=True)
    (grad,) = torch.autograd.grad(u[0] @ u[1], f)
    base = f0.numpy()
    fd = np.zeros_like(base)
    step = 1e-6
    for idx in np.ndindex(base.shape):
        plus, minus = base.copy(), base.copy()
        plus[idx] += step
        minus[idx] -= step
        fd[idx] = (frozen_cos(plus) - frozen_cos(minus)) / (2 * step)
    np.testing.assert_allclose(grad.numpy(), fd, atol=1e-7)
    # and it differs from the full gradient
    f2 = f0.clone().requires_grad_()
    u2 = cka.unit_grams(f2, detach_diagonal=False)
    (grad_full,) = torch.autograd.grad(u2[0] @ u2[1], f2)
    assert (grad_full - grad).abs().max().item() > 1e-3
