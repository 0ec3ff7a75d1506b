"""diverse.metrics.selective: risk-coverage curves against direct loops, closed forms, ties."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from diverse.metrics import selective as sel

# ----------------------------------------------------------------------- references


def ref_curve(u: np.ndarray, e: np.ndarray) -> tuple[list[float], list[float]]:
    """Risk and generalized risk by a direct loop over the k least uncertain (no ties)."""
    order = sorted(range(len(u)), key=lambda i: u[i])
    n = len(u)
    risk, grisk = [], []
    for k in range(1, n + 1):
        errs = sum(float(e[i]) for i in order[:k])
        risk.append(errs / k)
        grisk.append(errs / n)
    return risk, grisk


def ref_oracle_aurc(e: np.ndarray) -> float:
    """AURC of the ranking that puts every correct example first, by a loop."""
    ordered = sorted(float(x) for x in e)  # zeros (correct) first
    total = 0.0
    for k in range(1, len(ordered) + 1):
        total += sum(ordered[:k]) / k
    return total / len(ordered)


def ref_metrics(u: np.ndarray, e: np.ndarray) -> dict[str, float]:
    risk, grisk = ref_curve(u, e)
    aurc = sum(risk) / len(risk)
    return {"aurc": aurc, "augrc": sum(grisk) / len(grisk), "e_aurc": aurc - ref_oracle_aurc(e)}


def brute_force_tied(u: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected E_k over every tie-breaking order: average over all N! permutations."""
    n = len(u)
    total = np.zeros(n)
    count = 0
    for perm in itertools.permutations(range(n)):
        # ties broken by the position in the permutation
        rank = {i: pos for pos, i in enumerate(perm)}
        order = sorted(range(n), key=lambda i: (u[i], rank[i]))
        total += np.cumsum([float(e[i]) for i in order])
        count += 1
    return total / count, np.arange(1, n + 1)


def t64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


# ----------------------------------------------------------------- random agreement


@pytest.mark.parametrize("n", [1, 2, 7, 50, 333])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_areas_match_direct_loop(n, seed):
    rng = np.random.default_rng(1000 * n + seed)
    u = rng.normal(size=n)
    e = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(np.float64)
    ref = ref_metrics(u, e)
    assert sel.aurc(t64(u), t64(e)) == pytest.approx(ref["aurc"], abs=1e-9)
    assert sel.augrc(t64(u), t64(e)) == pytest.approx(ref["augrc"], abs=1e-9)
    assert sel.e_aurc(t64(u), t64(e)) == pytest.approx(ref["e_aurc"], abs=1e-9)
    assert sel.oracle_aurc(t64(e)) == pytest.approx(ref_oracle_aurc(e), abs=1e-9)
    assert sel.e_aurc(t64(u), t64(e)) >= -1e-12
    risk, grisk = ref_curve(u, e)
    curve = sel.risk_coverage(t64(u), t64(e))
    np.testing.assert_allclose(curve["risk"].numpy(), risk, rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve["generalized_risk"].numpy(), grisk, rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve["coverage"].numpy(), np.arange(1, n + 1) / n, atol=1e-15)
    assert all(v.dtype == torch.float64 and v.shape == (n,) for v in curve.values())


def test_bool_and_int_errors_and_float32_uncertainty_accepted():
    rng = np.random.default_rng(5)
    u = rng.normal(size=40)
    e = rng.random(40) < 0.3
    ref = ref_metrics(u, e.astype(np.float64))
    u32 = torch.tensor(u, dtype=torch.float32)
    ref32 = ref_metrics(u32.double().numpy(), e.astype(np.float64))
    assert sel.aurc(t64(u), torch.tensor(e)) == pytest.approx(ref["aurc"], abs=1e-12)
    assert sel.aurc(t64(u), torch.tensor(e.astype(np.int64))) == pytest.approx(
        ref["aurc"], abs=1e-12)
    assert sel.augrc(u32, torch.tensor(e)) == pytest.approx(ref32["augrc"], abs=1e-12)


# --------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("n_err", [0, 1, 3, 9, 10])
def test_perfect_ranking_has_zero_e_aurc(n_err):
    n = 10
    rng = np.random.default_rng(n_err)
    e = np.zeros(n)
    e[rng.permutation(n)[:n_err]] = 1.0
    # every error is more uncertain than every correct example
    u = np.where(e == 1, 10.0 + rng.random(n), rng.random(n))
    assert abs(sel.e_aurc(t64(u), t64(e))) <= 1e-12
    assert sel.aurc(t64(u), t64(e)) == pytest.approx(sel.oracle_aurc(t64(e)), abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_all_correct_and_all_wrong(n):
    u = t64(np.random.default_rng(n).normal(size=n))
    zeros, ones = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    assert sel.aurc(u, zeros) == 0.0
    assert sel.augrc(u, zeros) == 0.0
    assert sel.e_aurc(u, zeros) == 0.0
    assert sel.aurc(u, ones) == pytest.approx(1.0, abs=1e-12)
    assert sel.augrc(u, ones) == pytest.approx((n + 1) / (2 * n), abs=1e-12)
    assert sel.e_aurc(u, ones) == pytest.approx(0.0, abs=1e-12)  # oracle is also all wrong


def test_reversed_ranking_by_hand():
    # correct examples are the most uncertain: the two errors are accepted first
    u = t64([0.1, 0.2, 0.3, 0.4])
    e = t64([1, 1, 0, 0])
    # E_k = 1, 2, 2, 2 ; r_k = 1, 1, 2/3, 1/2 ; g_k = 1/4, 2/4, 2/4, 2/4
    # oracle E*_k = 0, 0, 1, 2 ; r*_k = 0, 0, 1/3, 1/2
    assert sel.aurc(u, e) == pytest.approx(19 / 24, abs=1e-12)
    assert sel.augrc(u, e) == pytest.approx(7 / 16, abs=1e-12)
    assert sel.oracle_aurc(e) == pytest.approx(5 / 24, abs=1e-12)
    assert sel.e_aurc(u, e) == pytest.approx(14 / 24, abs=1e-12)
    curve = sel.risk_coverage(u, e)
    np.testing.assert_allclose(curve["risk"].numpy(), [1, 1, 2 / 3, 1 / 2], atol=1e-12)
    # the same examples in another input order give the same figures
    perm = torch.tensor([2, 0, 3, 1])
    assert sel.aurc(u[perm], e[perm]) == pytest.approx(19 / 24, abs=1e-12)


@pytest.mark.parametrize("n,n_err", [(1, 0), (1, 1), (5, 2), (8, 3), (13, 7)])
def test_constant_uncertainty_gives_error_rate_everywhere(n, n_err):
    e = np.zeros(n)
    e[:n_err] = 1.0
    np.random.default_rng(n).shuffle(e)
    curve = sel.risk_coverage(torch.zeros(n, dtype=torch.float64), t64(e))
    np.testing.assert_allclose(curve["risk"].numpy(), np.full(n, n_err / n), rtol=0, atol=1e-12)
    np.testing.assert_allclose(curve["generalized_risk"].numpy(),
                               np.arange(1, n + 1) * (n_err / n) / n, rtol=0, atol=1e-12)
    assert sel.aurc(torch.zeros(n, dtype=torch.float64), t64(e)) == pytest.approx(
        n_err / n, abs=1e-12)


@pytest.mark.parametrize("u,e", [
    ([0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0]),
    ([1, 1, 1, 1, 1], [0, 0, 1, 1, 1]),
    ([0, 1, 1, 1, 2, 2], [1, 0, 1, 0, 1, 0]),
    ([3, 1, 3, 1, 2, 3], [1, 1, 0, 0, 1, 1]),
    ([2, 2, 5, 5], [0, 1, 0, 1]),
    ([0.5, -1.0, 0.5], [0, 1, 1]),
    ([1, 2, 3, 4, 5], [1, 0, 1, 0, 1]),
])
def test_ties_match_brute_force_over_all_permutations(u, e):
    u, e = np.asarray(u, dtype=np.float64), np.asarray(e, dtype=np.float64)
    expected_e, k = brute_force_tied(u, e)
    n = len(u)
    got = sel.expected_errors(t64(u), t64(e)).numpy()
    np.testing.assert_allclose(got, expected_e, rtol=0, atol=1e-12)
    assert sel.aurc(t64(u), t64(e)) == pytest.approx(float(np.mean(expected_e / k)), abs=1e-12)
    assert sel.augrc(t64(u), t64(e)) == pytest.approx(float(np.mean(expected_e / n)), abs=1e-12)
    # the input order of tied examples does not matter
    perm = torch.from_numpy(np.random.default_rng(0).permutation(n))
    assert sel.aurc(t64(u)[perm], t64(e)[perm]) == pytest.approx(
        sel.aurc(t64(u), t64(e)), abs=1e-12)


def test_ties_match_random_tie_breaking_average():
    rng = np.random.default_rng(11)
    n = 14
    u = rng.integers(0, 3, size=n).astype(np.float64)
    e = (rng.random(n) < 0.5).astype(np.float64)
    trials = 4000
    areas = []
    for _ in range(trials):
        jitter = rng.random(n) * 1e-3  # breaks ties only (groups are 1 apart)
        areas.append(ref_metrics(u + jitter, e)["aurc"])
    mean, sd = float(np.mean(areas)), float(np.std(areas))
    got = sel.aurc(t64(u), t64(e))
    assert sd > 0  # the ties do matter for a single order
    assert abs(got - mean) < 5 * sd / math.sqrt(trials)


# --------------------------------------------------------------- accuracy at coverage


def ref_accuracy_at(u: np.ndarray, e: np.ndarray, c: float) -> float:
    n = len(u)
    k = max(1, math.ceil(Fraction(str(c)) * n))
    order = np.argsort(u, kind="stable")
    return 1.0 - float(e[order[:k]].sum()) / k


@pytest.mark.parametrize("n", [1, 7, 20, 101])
@pytest.mark.parametrize("c", [0.01, 0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 1.0])
def test_accuracy_at_coverage_direct(n, c):
    rng = np.random.default_rng(n)
    u = rng.normal(size=n)
    e = (rng.random(n) < 0.4).astype(np.float64)
    got = sel.accuracy_at_coverage(t64(u), t64(e), c)
    assert got == pytest.approx(ref_accuracy_at(u, e, c), abs=1e-12)


def test_accuracy_at_coverage_by_hand():
    u = t64([0.5, 0.1, 0.9, 0.3, 0.7])  # order: 1, 3, 0, 4, 2
    e = t64([1, 0, 1, 0, 0])  # sorted errors: 0, 0, 1, 0, 1
    assert sel.accuracy_at_coverage(u, e, 0.4) == pytest.approx(1.0, abs=1e-15)  # k = 2
    assert sel.accuracy_at_coverage(u, e, 0.5) == pytest.approx(2 / 3, abs=1e-15)  # k = 3
    assert sel.accuracy_at_coverage(u, e, 0.6) == pytest.approx(2 / 3, abs=1e-15)  # k = 3
    assert sel.accuracy_at_coverage(u, e, 0.8) == pytest.approx(3 / 4, abs=1e-15)
    assert sel.accuracy_at_coverage(u, e, 1.0) == pytest.approx(3 / 5, abs=1e-15)
    assert sel.accuracy_at_coverage(u, e, 0.01) == pytest.approx(1.0, abs=1e-15)  # k = 1


@pytest.mark.parametrize("c", [0.0, -0.1, 1.0001, 2.0])
def test_accuracy_at_coverage_rejects_bad_coverage(c):
    with pytest.raises(ValueError):
        sel.accuracy_at_coverage(t64([0.1, 0.2]), t64([0, 1]), c)


@pytest.mark.parametrize("tied", [False, True])
def test_selective_metrics_keys_and_consistency(tied):
    rng = np.random.default_rng(3)
    n = 57
    u = rng.integers(0, 5, size=n).astype(np.float64) if tied else rng.normal(size=n)
    e = (rng.random(n) < 0.35).astype(np.float64)
    out = sel.selective_metrics(t64(u), t64(e))
    assert set(out) == {"aurc", "e_aurc", "augrc", "accuracy_at_50", "accuracy_at_80",
                        "accuracy_at_90", "accuracy_at_95"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["aurc"] == pytest.approx(sel.aurc(t64(u), t64(e)), abs=1e-12)
    assert out["e_aurc"] == pytest.approx(sel.e_aurc(t64(u), t64(e)), abs=1e-12)
    assert out["augrc"] == pytest.approx(sel.augrc(t64(u), t64(e)), abs=1e-12)
    for c in sel.COVERAGES:
        assert out[f"accuracy_at_{round(100 * c)}"] == pytest.approx(
            sel.accuracy_at_coverage(t64(u), t64(e), c), abs=1e-12)
    if not tied:
        ref = ref_metrics(u, e)
        for key in ("aurc", "e_aurc", "augrc"):
            assert out[key] == pytest.approx(ref[key], abs=1e-9)
        assert out["accuracy_at_90"] == pytest.approx(ref_accuracy_at(u, e, 0.9), abs=1e-12)
    custom = sel.selective_metrics(t64(u), t64(e), coverages=(0.25, 1.0))
    assert set(custom) == {"aurc", "e_aurc", "augrc", "accuracy_at_25", "accuracy_at_100"}
    assert custom["accuracy_at_100"] == pytest.approx(1 - e.mean(), abs=1e-12)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [sel.aurc, sel.augrc, sel.e_aurc, sel.risk_coverage,
                                sel.selective_metrics, sel.expected_errors])
@pytest.mark.parametrize("u,e", [
    (torch.zeros(2, 3), torch.zeros(2, 3)),  # 2-d
    (torch.zeros(3), torch.zeros(4)),  # shape mismatch
    (torch.zeros(3), torch.zeros(3, 1)),
    (torch.zeros(0), torch.zeros(0)),  # empty
    (torch.tensor([0.1, float("nan"), 0.3]), torch.zeros(3)),  # NaN uncertainty
    (torch.zeros(3), torch.tensor([0.0, 2.0, 1.0])),  # not 0/1
    (torch.zeros(3), torch.tensor([0.0, 0.5, 1.0])),
    (torch.zeros(3), torch.tensor([0.0, -1.0, 1.0])),
    (torch.zeros(3), torch.tensor([0.0, float("nan"), 1.0])),
    ([0.1, 0.2], torch.zeros(2)),  # not a tensor
    (torch.zeros(2), [0, 1]),
])
def test_bad_inputs_raise(fn, u, e):
    with pytest.raises(ValueError):
        fn(u, e)


def test_accuracy_at_coverage_validates_inputs():
    with pytest.raises(ValueError):
        sel.accuracy_at_coverage(torch.tensor([0.1, float("nan")]), torch.zeros(2), 0.5)
    with pytest.raises(ValueError):
        sel.accuracy_at_coverage(torch.zeros(2), torch.tensor([0.0, 3.0]), 0.5)


@pytest.mark.parametrize("e", [
    torch.tensor([0.0, 2.0]),  # not 0/1 (silently gives an "AURC" of 1.0)
    torch.tensor([0.5, 0.5]),
    torch.tensor([0.0, float("nan")]),
    torch.tensor([[0.0, 1.0], [1.0, 1.0]]),  # 2-d (silently gives 1.75 > 1)
    torch.zeros(0),  # empty
])
def test_oracle_aurc_validates_errors(e):
    # oracle_aurc is public and takes the same errors as the other functions
    with pytest.raises(ValueError):
        sel.oracle_aurc(e)
