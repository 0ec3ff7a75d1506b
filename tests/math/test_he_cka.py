"""Tests for diverse.math.he_cka: energies and geodesics against hand computations, HE-CKA on
cases whose CKA is known in closed form, layer weights and warm-up, autograd against
finite differences, and the paper's key property: the gradient of HE-CKA stays large
where the gradient of 1 − CKA vanishes (nearly identical members)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from diverse.errors import UserError
from diverse.math import cka, he_cka


def _randn(*shape: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# With one feature per example (P = 1) and the linear kernel, centered Gram = (Hf)(Hf)ᵀ,
# so CKA(f, g) = corr(f, g)². These zero-mean vectors give corr(f, g) = 1/2,
# corr(f, h) = 0, corr(g, h) = −1/2, i.e. CKA = 1/4, 0, 1/4.
F1 = [1.0, -1.0, 0.0, 0.0]
F2 = [1.0, 0.0, -1.0, 0.0]
F3 = [0.0, 0.0, 1.0, -1.0]


def _members(*rows: list[float]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float64).unsqueeze(-1)  # (M, B, 1)


def _riesz(c: float, s: float, eps: float, eps_arc: float) -> float:
    theta = math.acos(c / (1 + eps_arc))
    return -math.log(theta + eps) if s == 0 else (1 + eps) / (theta**s + eps)


def _expo(c: float, s: float, eps: float, eps_arc: float) -> float:
    return math.exp(-(s * math.acos(c / (1 + eps_arc)) + eps))


# --------------------------------------------------------------------------- pieces


def test_geodesic_matches_arccos_with_zero_diagonal():
    u = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]], dtype=torch.float64)
    th = he_cka.geodesic(u, eps_arc=0.01)
    assert th[0, 1].item() == pytest.approx(math.acos(0.6 / 1.01), rel=1e-12)
    assert th[1, 2].item() == pytest.approx(math.acos(-0.6 / 1.01), rel=1e-12)
    assert th[0, 2].item() == pytest.approx(math.acos(-1 / 1.01), rel=1e-12)
    assert th.diagonal().abs().max().item() == 0.0
    torch.testing.assert_close(th, th.mT)
    # eps_arc = 0: identical points are at distance 0 (clamped cosine, no NaN)
    th0 = he_cka.geodesic(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), eps_arc=0.0)
    assert th0[0, 1].item() == 0.0
    with pytest.raises(UserError, match="eps_arc"):
        he_cka.geodesic(u, eps_arc=-1e-3)


def test_energies_match_formulas():
    th = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    for t, e in zip(th.tolist(), he_cka.riesz_energy(th, s=2.0, eps=1e-3).tolist(), strict=True):
        assert e == pytest.approx(1.001 / (t**2 + 1e-3), rel=1e-12)
    for t, e in zip(th.tolist(), he_cka.riesz_energy(th, s=0.0, eps=1e-3).tolist(), strict=True):
        assert e == pytest.approx(-math.log(t + 1e-3), rel=1e-12)
    for t, e in zip(th.tolist(), he_cka.riesz_energy(th, s=1.5, eps=0.0).tolist(), strict=True):
        assert e == pytest.approx(t**-1.5, rel=1e-12)
    for t, e in zip(
        th.tolist(), he_cka.exponential_energy(th, s=3.0, eps=0.01).tolist(), strict=True
    ):
        assert e == pytest.approx(math.exp(-(3.0 * t + 0.01)), rel=1e-12)
    assert he_cka.riesz_energy(torch.tensor(1.0), s=2.0).item() == pytest.approx(1.0)
    with pytest.raises(UserError, match="s must be >= 0"):
        he_cka.riesz_energy(th, s=-1.0)


# --------------------------------------------------------------------------- the term


def test_he_cka_two_members_hand_computed():
    f = _members(F1, F2)
    for s in (2.0, 1.0, 0.0):
        got = he_cka.he_cka(f, s=s, eps=1e-3, eps_arc=0.01).item()
        assert got == pytest.approx(_riesz(0.25, s, 1e-3, 0.01), rel=1e-10)
    got = he_cka.he_cka(f, s=2.0, energy="exponential", eps=1e-3, eps_arc=0.01).item()
    assert got == pytest.approx(_expo(0.25, 2.0, 1e-3, 0.01), rel=1e-10)
    # defaults: s = 2, eps = 1e-6, eps_arc = 1e-3
    assert he_cka.he_cka(f).item() == pytest.approx(_riesz(0.25, 2.0, 1e-6, 1e-3), rel=1e-10)


def test_he_cka_three_members_hand_computed():
    f = _members(F1, F2, F3)  # CKA: (1,2) = 1/4, (1,3) = 0, (2,3) = 1/4
    for s in (2.0, 0.0):
        want = (2 * _riesz(0.25, s, 1e-4, 1e-3) + _riesz(0.0, s, 1e-4, 1e-3)) / 3
        assert he_cka.he_cka(f, s=s, eps=1e-4).item() == pytest.approx(want, rel=1e-10)
    want = (2 * _expo(0.25, 1.0, 1e-4, 1e-3) + _expo(0.0, 1.0, 1e-4, 1e-3)) / 3
    got = he_cka.he_cka(f, s=1.0, energy="exponential", eps=1e-4).item()
    assert got == pytest.approx(want, rel=1e-10)


def test_he_cka_one_sided_centering_matches_numpy():
    f = _randn(3, 6, 2, seed=1)
    n = 6
    h = np.eye(n) - np.ones((n, n)) / n
    vs = [(f[m].numpy() @ f[m].numpy().T @ h).ravel() for m in range(3)]
    vs = [v / np.linalg.norm(v) for v in vs]
    pairs = [(0, 1), (0, 2), (1, 2)]
    want = np.mean([_riesz(float(vs[a] @ vs[b]), 2.0, 1e-6, 1e-3) for a, b in pairs])
    got = he_cka.he_cka(f, centering="one-sided").item()
    assert got == pytest.approx(want, rel=1e-9)
    assert abs(he_cka.he_cka(f).item() - got) > 1e-3


def test_he_cka_single_member_is_zero_and_bad_names_raise():
    assert he_cka.he_cka(_randn(1, 5, 3)).item() == 0.0
    with pytest.raises(UserError, match="'coulomb'.*riesz, exponential"):
        he_cka.he_cka(_randn(2, 5, 3), energy="coulomb")
    with pytest.raises(UserError, match="'poly'"):
        he_cka.he_cka(_randn(2, 5, 3), kernel="poly")
    with pytest.raises(UserError, match="'both'"):
        he_cka.he_cka(_randn(2, 5, 3), centering="both")


def test_he_cka_decreases_as_members_become_dissimilar():
    f = _randn(8, 4, seed=2)
    near = torch.stack([f, f + 0.05 * _randn(8, 4, seed=3)])
    far = torch.stack([f, _randn(8, 4, seed=4)])
    c_near, c_far = cka.cka_matrix(near)[0, 1].item(), cka.cka_matrix(far)[0, 1].item()
    assert c_near > c_far
    assert he_cka.he_cka(near).item() > 10 * he_cka.he_cka(far).item()


# --------------------------------------------------------------------------- gradients


def _grads_near_identical(delta: float, eps_arc: float = 1e-3) -> tuple[float, float, float]:
    """(HE, ‖∂HE/∂F₂‖, ‖∂(1 − CKA)/∂F₂‖) for members F and F + δG."""
    f, g = _randn(16, 6, seed=5), _randn(16, 6, seed=6)
    f2 = (f + delta * g).requires_grad_()
    he = he_cka.he_cka(torch.stack([f, f2]), eps_arc=eps_arc)
    (g_he,) = torch.autograd.grad(he, f2)
    f2b = (f + delta * g).requires_grad_()
    one_minus = 1.0 - cka.cka_matrix(torch.stack([f, f2b]))[0, 1]
    (g_cka,) = torch.autograd.grad(one_minus, f2b)
    return he.item(), g_he.norm().item(), g_cka.norm().item()


def test_he_gradient_stays_large_where_one_minus_cka_gradient_vanishes():
    he, g_he, g_cka = _grads_near_identical(1e-3)
    assert math.isfinite(he) and math.isfinite(g_he)
    assert g_cka < 1e-3  # 1 − CKA is flat at its minimum: gradient O(δ)
    assert g_he > 10.0
    assert g_he > 1e4 * g_cka
    # shrinking δ tenfold shrinks the CKA gradient tenfold (−sin θ → 0) ...
    _, _, g_cka_10 = _grads_near_identical(1e-2)
    assert g_cka_10 / g_cka == pytest.approx(10.0, rel=0.05)
    # ... while the HE/CKA gradient ratio grows
    _, g_he_10, _ = _grads_near_identical(1e-2)
    assert g_he / g_cka > 1.05 * (g_he_10 / g_cka_10)


def test_he_gradient_is_finite_for_identical_members():
    f = _randn(6, 3, seed=7)
    feats = torch.stack([f, f.clone()]).requires_grad_()
    he = he_cka.he_cka(feats)
    (grad,) = torch.autograd.grad(he, feats)
    # θ is floored at arccos(1/(1 + ε_arc)), so the energy is bounded ...
    theta_min = math.acos(1 / 1.001)
    assert he.item() == pytest.approx((1 + 1e-6) / (theta_min**2 + 1e-6), rel=1e-8)
    # ... and the gradient finite (zero: identical members are a symmetric point)
    assert torch.isfinite(grad).all()
    assert grad.abs().max().item() < 1e-6
    # small ε_arc: the energy and gradient near identity grow without bound
    _, g_small, _ = _grads_near_identical(1e-3, eps_arc=1e-7)
    _, g_default, _ = _grads_near_identical(1e-3)
    assert g_small > 5 * g_default


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"kernel": "cosine"},
        {"centering": "one-sided"},
        {"s": 0.0},
        {"s": 0.5},
        {"energy": "exponential"},
    ],
    ids=["linear", "cosine", "one-sided", "log", "s0.5", "exponential"],
)
def test_he_cka_gradcheck(kw):
    f = _randn(3, 4, 2, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: he_cka.he_cka(x, detach_diagonal=False, **kw), (f,), eps=1e-6, atol=1e-5
    )


def test_he_cka_gradcheck_rbf_with_fixed_bandwidth(monkeypatch):
    """The median bandwidth is detached by design; fix it to check the rest exactly."""
    monkeypatch.setattr(
        cka, "rbf_bandwidth", lambda sq: torch.full((*sq.shape[:-2], 1, 1), 1.7, dtype=sq.dtype)
    )
    f = _randn(3, 4, 2, seed=9).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: he_cka.he_cka(x, kernel="rbf", detach_diagonal=False),
        (f,),
        eps=1e-6,
        atol=1e-5,
    )


# --------------------------------------------------------------------------- layers and time


def test_layer_weights_first_middle_last_schedule():
    w = he_cka.layer_weights(5)
    raw = [0.0, 0.5, 2.25, 4.0, 6.5]
    assert he_cka.first_middle_last(5) == pytest.approx(raw)
    assert w == pytest.approx([r / 13.25 for r in raw])
    assert sum(w) == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(w, w[1:], strict=False))  # grows with depth
    assert he_cka.layer_weights(2) == pytest.approx([0.0, 1.0])
    assert he_cka.layer_weights(3) == pytest.approx([0.0, 0.5 / 7.0, 6.5 / 7.0])
    assert he_cka.layer_weights(1) == [1.0]
    assert he_cka.layer_weights(4, "uniform") == pytest.approx([0.25] * 4)
    assert he_cka.layer_weights(5, normalize=False) == pytest.approx(raw)
    assert he_cka.first_middle_last(4, 1.0, 2.0, 3.0, 10.0) == pytest.approx([1, 2, 5, 10])


def test_layer_weights_explicit_list():
    assert he_cka.layer_weights(3, [1.0, 1.0, 2.0]) == pytest.approx([0.25, 0.25, 0.5])
    assert he_cka.layer_weights(2, [0.3, 0.1], normalize=False) == pytest.approx([0.3, 0.1])
    with pytest.raises(UserError, match="length 2, expected 3"):
        he_cka.layer_weights(3, [1.0, 2.0])
    with pytest.raises(UserError, match=">= 0"):
        he_cka.layer_weights(2, [1.0, -0.5])
    with pytest.raises(UserError, match="positive sum"):
        he_cka.layer_weights(2, [0.0, 0.0])
    with pytest.raises(UserError, match="'deep'.*first-middle-last, uniform"):
        he_cka.layer_weights(2, "deep")
    with pytest.raises(UserError, match="n_layers"):
        he_cka.layer_weights(0)


def test_warmup_is_a_linear_ramp():
    assert [he_cka.warmup(t, 4) for t in range(6)] == pytest.approx(
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    )
    assert he_cka.warmup(0, 0) == 1.0
    assert he_cka.warmup(7, 0) == 1.0
    with pytest.raises(UserError, match="step"):
        he_cka.warmup(-1, 10)


def test_he_cka_layers_weights_and_flattens_conv_features():
    conv = _randn(3, 5, 2, 3, 3, seed=10)  # (M, B, C, H, W)
    dense = _randn(3, 5, 4, seed=11)
    first = _randn(3, 5, 6, seed=12)
    feats = {"first": first, "conv": conv, "fc": dense}
    w = he_cka.layer_weights(3)  # [0, 0.5/7, 6.5/7]: the first layer is skipped
    got = he_cka.he_cka_layers(feats, w, s=2.0)
    want = (
        w[0] * he_cka.he_cka(first)
        + w[1] * he_cka.he_cka(conv.reshape(3, 5, 18))
        + w[2] * he_cka.he_cka(dense)
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    got_exp = he_cka.he_cka_layers(feats, [0.2, 0.3, 0.5], energy="exponential", s=1.0)
    want_exp = sum(
        wi * he_cka.he_cka(cka.as_matrix(x), energy="exponential", s=1.0).item()
        for wi, x in zip([0.2, 0.3, 0.5], feats.values(), strict=True)
    )
    assert got_exp.item() == pytest.approx(want_exp, rel=1e-12)
    assert he_cka.he_cka_layers(feats, [0.0, 0.0, 0.0]).item() == 0.0
    with pytest.raises(UserError, match="2 layer weights for 3 feature layers"):
        he_cka.he_cka_layers(feats, [0.5, 0.5])
