"""Tests for diverse.math.calibration: temperature scaling against grid search / scipy, closed
forms, std scaling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import scipy.special
import torch

from diverse import metrics as mt
from diverse.math import calibration as cal


def t64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


# ----------------------------------------------------------------------- references


def np_nll(temperature: float, labels: np.ndarray, mode: str, logits: np.ndarray) -> float:
    """Independent NumPy NLL of the two temperature-scaling orders."""
    n = labels.shape[0]
    if mode == "pooled":
        logpbar = np.log(scipy.special.softmax(logits, -1).mean(0))
        logp = scipy.special.log_softmax(logpbar / temperature, -1)
    else:
        member = scipy.special.log_softmax(logits / temperature, -1)
        logp = scipy.special.logsumexp(member, axis=0) - math.log(logits.shape[0])
    return float(-logp[np.arange(n), labels].mean())


def scipy_temperature(labels: np.ndarray, mode: str, logits: np.ndarray) -> float:
    res = scipy.optimize.minimize_scalar(lambda th: np_nll(math.exp(th), labels, mode, logits),
                                         bounds=(-4.0, 4.0), method="bounded",
                                         options={"xatol": 1e-11})
    return math.exp(res.x)


def grid_temperature(labels: torch.Tensor, mode: str, logits: torch.Tensor) -> float:
    """Dense coarse-to-fine grid search of cal.temperature_nll (unimodal objective)."""
    probs = logits.softmax(-1) if mode == "pooled" else None

    def objective(t: float) -> float:
        return cal.temperature_nll(t, labels, mode, probs=probs, logits=logits)

    grid = np.geomspace(0.1, 20.0, 170)  # ratio 1.032 between neighbours
    best = grid[int(np.argmin([objective(t) for t in grid]))]
    for half, step in ((0.04, 1e-3), (1.2e-3, 5e-5), (6e-5, 2e-6)):
        half, step = half * best, step * best
        grid = np.arange(best - half, best + half + step / 2, step)
        best = grid[int(np.argmin([objective(t) for t in grid]))]
    return float(best)


def synthetic(seed: int, scale: float, s: int = 5, n: int = 2000, c: int = 10):
    """Member logits = scale * (true logits + member noise); labels drawn from the truth."""
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(n, c)) * 1.5
    p_true = scipy.special.softmax(true, -1)
    labels = (p_true.cumsum(1) > rng.random((n, 1))).argmax(1)
    logits = scale * (true[None] + 0.5 * rng.normal(size=(s, n, c)))
    return logits, labels


# --------------------------------------------------------------- temperature scaling


@pytest.mark.parametrize("mode", ["pooled", "members"])
def test_temperature_nll_matches_numpy(mode):
    logits, labels = synthetic(0, 2.0, s=3, n=200, c=6)
    z, y = t64(logits), torch.from_numpy(labels)
    for t in (0.3, 1.0, 2.7):
        got = cal.temperature_nll(t, y, mode, probs=z.softmax(-1), logits=z)
        assert got == pytest.approx(np_nll(t, labels, mode, logits), abs=1e-12)
    # at T = 1 both orders are the NLL of the ensemble mean
    ref = float(mt.nll(z.softmax(-1), y, eps=0.0))
    assert cal.temperature_nll(1.0, y, mode, probs=z.softmax(-1), logits=z) == pytest.approx(
        ref, abs=1e-12)


@pytest.mark.parametrize("mode", ["pooled", "members"])
def test_fit_temperature_matches_grid_search_overconfident(mode):
    logits, labels = synthetic(1, 3.0)
    z, y = t64(logits), torch.from_numpy(labels)
    probs = z.softmax(-1)
    t_fit = cal.fit_temperature(y, mode, probs=probs, logits=z)
    t_grid = grid_temperature(y, mode, z)
    assert t_fit == pytest.approx(t_grid, abs=1e-3)
    assert t_fit > 1.5  # overconfident members are cooled down
    before = cal.temperature_nll(1.0, y, mode, probs=probs, logits=z)
    after = cal.temperature_nll(t_fit, y, mode, probs=probs, logits=z)
    assert after <= before
    assert after <= cal.temperature_nll(t_grid, y, mode, probs=probs, logits=z) + 1e-12
    # and against scipy on the independent NumPy objective
    assert t_fit == pytest.approx(scipy_temperature(labels, mode, logits), abs=1e-5)


@pytest.mark.parametrize("mode", ["pooled", "members"])
def test_fit_temperature_underconfident_gives_t_below_one(mode):
    logits, labels = synthetic(2, 0.3, n=1000)
    z, y = t64(logits), torch.from_numpy(labels)
    t_fit = cal.fit_temperature(y, mode, probs=z.softmax(-1), logits=z)
    assert t_fit < 1.0
    assert t_fit == pytest.approx(scipy_temperature(labels, mode, logits), abs=1e-5)


def test_pooled_from_logits_only_equals_from_probs():
    logits, labels = synthetic(3, 2.0, n=500)
    z, y = t64(logits), torch.from_numpy(labels)
    a = cal.fit_temperature(y, "pooled", probs=z.softmax(-1))
    b = cal.fit_temperature(y, "pooled", logits=z)
    assert a == pytest.approx(b, abs=1e-9)


def test_single_member_modes_agree():
    logits, labels = synthetic(4, 2.5, s=1, n=1500)
    z, y = t64(logits), torch.from_numpy(labels)
    pooled = cal.fit_temperature(y, "pooled", probs=z.softmax(-1))
    members = cal.fit_temperature(y, "members", logits=z)
    assert pooled == pytest.approx(members, abs=1e-6)
    assert pooled > 1.5


@pytest.mark.parametrize("q,a", [(0.8, 3.0), (0.9, 1.0), (0.65, 5.0)])
def test_binary_closed_form_temperature(q, a):
    # every example has margin a; a fraction q is labelled with the top class:
    # NLL(T) = -q log sig(a/T) - (1-q) log sig(-a/T), minimized where sig(a/T) = q
    n = 1000
    n_correct = round(q * n)
    rng = np.random.default_rng(0)
    top = rng.integers(0, 2, size=n)
    logits = np.zeros((n, 2))
    logits[np.arange(n), top] = a
    logits += rng.normal(size=(n, 1))  # a shift per example changes nothing
    correct = np.zeros(n, dtype=bool)
    correct[rng.permutation(n)[:n_correct]] = True
    labels = np.where(correct, top, 1 - top)
    expected = a / math.log(q / (1 - q))
    y = torch.from_numpy(labels)
    z1 = t64(logits[None])
    z3 = t64(np.repeat(logits[None], 3, axis=0))  # identical members
    assert cal.fit_temperature(y, "pooled", probs=z1.softmax(-1)) == pytest.approx(expected,
                                                                                   abs=1e-5)
    assert cal.fit_temperature(y, "members", logits=z1) == pytest.approx(expected, abs=1e-5)
    assert cal.fit_temperature(y, "members", logits=z3) == pytest.approx(expected, abs=1e-5)
    assert cal.fit_temperature(y, "pooled", probs=z3.softmax(-1)) == pytest.approx(expected,
                                                                                   abs=1e-5)


@pytest.mark.parametrize("mode", ["pooled", "members"])
def test_binary_random_members_against_scipy(mode):
    rng = np.random.default_rng(8)
    n, s = 800, 4
    base = rng.normal(size=(n, 2)) * 2
    logits = 2.0 * (base[None] + rng.normal(size=(s, n, 2)))
    labels = (scipy.special.softmax(base, -1)[:, 1] > rng.random(n)).astype(np.int64)
    z = t64(logits)
    got = cal.fit_temperature(torch.from_numpy(labels), mode, probs=z.softmax(-1), logits=z)
    assert got == pytest.approx(scipy_temperature(labels, mode, logits), abs=1e-5)


def test_apply_temperature_shapes_and_identity():
    logits, _ = synthetic(5, 2.0, s=4, n=30, c=5)
    z = t64(logits)
    probs = z.softmax(-1)
    pooled = cal.apply_temperature(1.0, "pooled", probs=probs)
    members = cal.apply_temperature(1.0, "members", logits=z)
    assert pooled.shape == (1, 30, 5) and members.shape == (4, 30, 5)
    assert pooled.dtype == members.dtype == torch.float64
    np.testing.assert_allclose(pooled[0].numpy(), probs.mean(0).numpy(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(members.numpy(), scipy.special.softmax(logits, -1), rtol=0,
                               atol=1e-14)
    # T = 2 against NumPy
    t = 2.0
    ref_pooled = scipy.special.softmax(np.log(scipy.special.softmax(logits, -1).mean(0)) / t, -1)
    np.testing.assert_allclose(cal.apply_temperature(t, "pooled", probs=probs)[0].numpy(),
                               ref_pooled, rtol=0, atol=1e-14)
    np.testing.assert_allclose(cal.apply_temperature(t, "members", logits=z).numpy(),
                               scipy.special.softmax(logits / t, -1), rtol=0, atol=1e-14)
    # the calibrated samples give the NLL that temperature_nll reports
    y = torch.from_numpy(np.arange(30) % 5)
    for mode in cal.MODES:
        out = cal.apply_temperature(t, mode, probs=probs, logits=z)
        assert float(mt.nll(out, y, eps=0.0)) == pytest.approx(
            cal.temperature_nll(t, y, mode, probs=probs, logits=z), abs=1e-12)


def test_pooled_log_probs():
    logits, _ = synthetic(6, 1.0, s=3, n=10, c=4)
    probs = t64(scipy.special.softmax(logits, -1))
    np.testing.assert_allclose(cal.pooled_log_probs(probs).numpy(),
                               np.log(probs.numpy().mean(0)), atol=1e-14)
    zero = t64([[[1.0, 0.0]]])
    assert float(cal.pooled_log_probs(zero)[0, 1]) == pytest.approx(math.log(1e-300))


def test_temperature_errors():
    logits, labels = synthetic(7, 1.0, s=2, n=20, c=3)
    z, y = t64(logits), torch.from_numpy(labels)
    with pytest.raises(ValueError, match="logits"):
        cal.fit_temperature(y, "members", probs=z.softmax(-1))
    with pytest.raises(ValueError):
        cal.temperature_nll(1.0, y, "members", probs=z.softmax(-1))
    with pytest.raises(ValueError):
        cal.apply_temperature(1.0, "members", probs=z.softmax(-1))
    for fn in (lambda m: cal.fit_temperature(y, m, logits=z),
               lambda m: cal.temperature_nll(1.0, y, m, logits=z),
               lambda m: cal.apply_temperature(1.0, m, logits=z)):
        with pytest.raises(ValueError, match="mode"):
            fn("ensemble")
    with pytest.raises(ValueError):
        cal.fit_temperature(y, "pooled")  # neither probs nor logits
    with pytest.raises(ValueError):
        cal.fit_temperature(y, "members", logits=z[0])  # (N, C)
    with pytest.raises(ValueError):
        cal.fit_temperature(y[:-1], "pooled", logits=z)  # wrong label count
    with pytest.raises(ValueError):
        cal.fit_temperature(y.double(), "pooled", logits=z)  # float labels


# --------------------------------------------------------------------- std scaling


def np_mixture_nll(s: float, means: np.ndarray, stds: np.ndarray, y: np.ndarray) -> float:
    mu_bar = means.mean(0, keepdims=True)
    m, sd = mu_bar + s * (means - mu_bar), s * stds
    logpdf = -0.5 * ((y - m) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)
    return float(-(scipy.special.logsumexp(logpdf, axis=0) - math.log(means.shape[0])).mean())


@pytest.mark.parametrize("shape", [(500,), (200, 3)])
@pytest.mark.parametrize("true_scale", [0.4, 1.0, 2.5])
def test_fit_std_scale_single_gaussian_closed_form(shape, true_scale):
    rng = np.random.default_rng(int(true_scale * 10))
    mu = rng.normal(size=shape)
    sigma = rng.uniform(0.2, 3.0, size=shape)
    y = mu + true_scale * sigma * rng.normal(size=shape)
    expected = math.sqrt(float(np.mean(((y - mu) / sigma) ** 2)))
    got = cal.fit_std_scale(t64(mu[None]), t64(sigma[None]), t64(y))
    assert got == pytest.approx(expected, abs=1e-6)


def test_apply_std_scale_keeps_mean_and_scales_std():
    rng = np.random.default_rng(1)
    means, stds = t64(rng.normal(size=(5, 40))), t64(rng.uniform(0.1, 2.0, size=(5, 40)))
    for s in (0.3, 1.0, 2.7):
        m2, s2 = cal.apply_std_scale(s, means, stds)
        assert m2.shape == means.shape and s2.shape == stds.shape
        np.testing.assert_allclose(m2.mean(0).numpy(), means.mean(0).numpy(), rtol=0, atol=1e-14)
        np.testing.assert_allclose(mt.predictive_std(m2, s2).numpy(),
                                   s * mt.predictive_std(means, stds).numpy(), rtol=1e-12)
        np.testing.assert_allclose(s2.numpy(), s * stds.numpy(), rtol=1e-15)
    m1, s1 = cal.apply_std_scale(1.0, means, stds)
    np.testing.assert_allclose(m1.numpy(), means.numpy(), atol=1e-14)


@pytest.mark.parametrize("seed,noise", [(0, 2.0), (1, 0.5)])
def test_fit_std_scale_mixture_against_scipy(seed, noise):
    rng = np.random.default_rng(seed)
    m, n = 4, 600
    center = rng.normal(size=n)
    means = center[None] + 0.5 * rng.normal(size=(m, n))
    stds = rng.uniform(0.3, 1.0, size=(m, n))
    y = center + noise * rng.normal(size=n)
    res = scipy.optimize.minimize_scalar(
        lambda th: np_mixture_nll(math.exp(th), means, stds, y), bounds=(-4.0, 4.0),
        method="bounded", options={"xatol": 1e-11})
    expected = math.exp(res.x)
    got = cal.fit_std_scale(t64(means), t64(stds), t64(y))
    assert got == pytest.approx(expected, abs=1e-5)
    assert (got > 1.0) == (noise > 1.0)
    # the fitted NLL is the metric's NLL of the scaled mixture and beats s = 1
    m2, s2 = cal.apply_std_scale(got, t64(means), t64(stds))
    nll_fit = float(mt.gaussian_mixture_nll(m2, s2, t64(y)))
    assert nll_fit == pytest.approx(np_mixture_nll(got, means, stds, y), abs=1e-12)
    assert nll_fit <= np_mixture_nll(1.0, means, stds, y)


def test_fit_std_scale_errors():
    with pytest.raises(ValueError):
        cal.fit_std_scale(t64(np.zeros((2, 5))), t64(np.ones((2, 4))), t64(np.zeros(5)))
    with pytest.raises(ValueError):
        cal.fit_std_scale(t64(np.zeros((2, 5))), t64(np.zeros((2, 5))), t64(np.zeros(5)))
    with pytest.raises(ValueError):
        cal.fit_std_scale(t64(np.zeros((2, 5))), t64(np.ones((2, 5))), t64(np.zeros(4)))
