"""diverse.metrics.conformal: quantile and scores by hand, prefix sets, coverage guarantee."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from diverse.metrics import conformal as cp


def t64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


# ------------------------------------------------------------------------- quantile


def ref_quantile(scores: np.ndarray, alpha: float) -> float:
    n = len(scores)
    k = math.ceil((n + 1) * (1 - Fraction(str(alpha))))  # exact rational arithmetic
    if k > n:
        return math.inf
    return float(sorted(scores.tolist())[k - 1])


@pytest.mark.parametrize("n", [1, 2, 5, 9, 10, 19, 20, 99, 100, 101, 1000])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
def test_conformal_quantile_is_kth_smallest(n, alpha):
    scores = np.random.default_rng(n).normal(size=n)
    assert cp.conformal_quantile(t64(scores), alpha) == ref_quantile(scores, alpha)


def test_conformal_quantile_by_hand():
    s = t64([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    # alpha = 0.1: k = ceil(10 * 0.9) = 9 -> the largest
    assert cp.conformal_quantile(s, 0.1) == 0.9
    # alpha = 0.2: k = ceil(8) = 8 -> 0.8 ; alpha = 0.25: k = ceil(7.5) = 8
    assert cp.conformal_quantile(s, 0.2) == 0.8
    assert cp.conformal_quantile(s, 0.25) == 0.8
    # alpha = 0.5: k = 5 -> 0.5
    assert cp.conformal_quantile(s, 0.5) == 0.5
    # alpha = 0.05: k = ceil(9.5) = 10 > 9 -> inf
    assert cp.conformal_quantile(s, 0.05) == math.inf
    assert cp.conformal_quantile(t64([3.0]), 0.4) == math.inf  # k = ceil(1.2) = 2 > 1
    assert cp.conformal_quantile(t64([3.0]), 0.5) == 3.0  # k = 1
    # ties and 2-d inputs (flattened)
    assert cp.conformal_quantile(t64([[1.0, 1.0], [2.0, 2.0]]), 0.5) == 2.0  # n = 4, k = 3
    assert cp.conformal_quantile(t64([[1.0, 1.0], [2.0, 2.0]]), 0.6) == 1.0  # k = ceil(2) = 2


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, True, "0.1", None, float("nan")])
def test_conformal_quantile_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError):
        cp.conformal_quantile(t64([0.1, 0.2, 0.3]), alpha)


def test_conformal_quantile_rejects_empty_and_nan():
    with pytest.raises(ValueError):
        cp.conformal_quantile(torch.zeros(0, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError):
        cp.conformal_quantile(t64([0.1, float("nan"), 0.3]), 0.5)


# ---------------------------------------------------------------- class scores by hand

# rows: classes ranked (descending p, ties by index): row 0 -> 1, 2, 0, 3 (0.1 tie: 0 before 3);
# row 1 -> 0, 2, 1, 3 ; row 2 -> 3, 2, 0, 1 (0.05 tie: 0 before 1)
P = [[0.1, 0.5, 0.3, 0.1],
     [0.4, 0.2, 0.25, 0.15],
     [0.05, 0.05, 0.1, 0.8]]
U = [0.25, 0.5, 0.75]


def test_lac_by_hand():
    got = cp.class_scores(t64(P), "lac")
    np.testing.assert_allclose(got.numpy(), 1 - np.array(P), rtol=0, atol=1e-15)
    assert got.dtype == torch.float64


def test_aps_non_randomized_by_hand():
    # s = mass ranked above + own mass
    expected = [[0.9, 0.5, 0.8, 1.0],
                [0.4, 0.85, 0.65, 1.0],
                [0.95, 1.0, 0.9, 0.8]]
    got = cp.class_scores(t64(P), "aps", randomized=False)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    # u is ignored when not randomized
    got_u = cp.class_scores(t64(P), "aps", u=t64(U), randomized=False)
    np.testing.assert_allclose(got_u.numpy(), expected, rtol=0, atol=1e-12)


def test_aps_randomized_by_hand():
    # s = mass ranked above + u * own mass
    expected = [[0.8 + 0.25 * 0.1, 0.25 * 0.5, 0.5 + 0.25 * 0.3, 0.9 + 0.25 * 0.1],
                [0.5 * 0.4, 0.65 + 0.5 * 0.2, 0.4 + 0.5 * 0.25, 0.85 + 0.5 * 0.15],
                [0.9 + 0.75 * 0.05, 0.95 + 0.75 * 0.05, 0.8 + 0.75 * 0.1, 0.75 * 0.8]]
    got = cp.class_scores(t64(P), "aps", u=t64(U))
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.numpy(), [[0.825, 0.125, 0.575, 0.925],
                                             [0.2, 0.75, 0.525, 0.925],
                                             [0.9375, 0.9875, 0.875, 0.6]], atol=1e-12)


def test_raps_randomized_by_hand():
    # lam = 0.1, k_reg = 1: penalty 0, 0.1, 0.2, 0.3 by rank 1..4
    expected = [[0.825 + 0.2, 0.125, 0.575 + 0.1, 0.925 + 0.3],
                [0.2, 0.75 + 0.2, 0.525 + 0.1, 0.925 + 0.3],
                [0.9375 + 0.2, 0.9875 + 0.3, 0.875 + 0.1, 0.6]]
    got = cp.class_scores(t64(P), "raps", u=t64(U), lam=0.1, k_reg=1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


def test_raps_non_randomized_by_hand():
    # lam = 0.5, k_reg = 2: penalty 0, 0, 0.5, 1.0 by rank 1..4
    expected = [[0.9 + 0.5, 0.5, 0.8, 1.0 + 1.0],
                [0.4, 0.85 + 0.5, 0.65, 1.0 + 1.0],
                [0.95 + 0.5, 1.0 + 1.0, 0.9, 0.8]]
    got = cp.class_scores(t64(P), "raps", lam=0.5, k_reg=2, randomized=False)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    # lam = 0 is APS
    np.testing.assert_allclose(
        cp.class_scores(t64(P), "raps", u=t64(U), lam=0.0).numpy(),
        cp.class_scores(t64(P), "aps", u=t64(U)).numpy(), atol=0)


def test_default_draws_are_seeded_uniforms():
    got = cp.class_scores(t64(P), "aps")
    np.testing.assert_allclose(got.numpy(),
                               cp.class_scores(t64(P), "aps", u=cp.uniform_draws(3)).numpy(),
                               atol=0)
    draws = cp.uniform_draws(5000)
    assert draws.dtype == torch.float64 and bool(((draws > 0) & (draws < 1)).all())
    assert torch.equal(draws, cp.uniform_draws(5000))
    assert scipy.stats.kstest(draws.numpy(), "uniform").pvalue > 1e-3


def test_label_scores_and_prediction_sets():
    scores = cp.class_scores(t64(P), "lac")
    np.testing.assert_allclose(cp.label_scores(scores, torch.tensor([1, 3, 0])).numpy(),
                               [0.5, 0.85, 0.95], atol=1e-15)
    sets = cp.prediction_sets(scores, 0.75)
    assert sets.dtype == torch.bool
    assert sets.tolist() == [[False, True, True, False],
                             [True, False, True, False],
                             [False, False, False, True]]


def test_class_scores_errors():
    with pytest.raises(ValueError):
        cp.class_scores(t64(P), "thr")
    with pytest.raises(ValueError):
        cp.class_scores(t64(P[0]), "aps")
    with pytest.raises(ValueError):
        cp.class_scores(t64([P]), "lac")
    with pytest.raises(ValueError):
        cp.class_scores(t64(P), "raps", lam=-0.1)
    with pytest.raises(ValueError):
        cp.class_scores(t64(P), "raps", k_reg=-1)


# ------------------------------------------------------------------ prefix property


@pytest.mark.parametrize("score", ["aps", "raps"])
@pytest.mark.parametrize("randomized", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aps_raps_sets_are_ranked_prefixes(score, randomized, seed):
    rng = np.random.default_rng(seed)
    n, c = 200, 8
    logits = rng.normal(size=(n, c)) * rng.uniform(0.3, 4.0, size=(n, 1))
    p = scipy.special.softmax(logits, -1)
    p[:20, :2] = p[:20, :2].mean(1, keepdims=True)  # some tied probabilities
    s = cp.class_scores(t64(p), score, u=t64(rng.random(n)), lam=0.05, k_reg=1,
                        randomized=randomized).numpy()
    order = np.lexsort((np.arange(c)[None].repeat(n, 0), -p), axis=-1)  # -p then index
    by_rank = np.take_along_axis(s, order, 1)
    assert (np.diff(by_rank, axis=1) >= -1e-12).all()  # non-decreasing in the rank
    for q in np.quantile(s, [0.05, 0.2, 0.5, 0.8, 0.95]):
        sets = cp.prediction_sets(t64(s), float(q)).numpy()
        ranked = np.take_along_axis(sets, order, 1)
        size = ranked.sum(1)
        prefix = np.arange(c)[None] < size[:, None]
        assert (ranked == prefix).all()
    if not randomized:  # u = 1: the top class has s = p_top <= 1, so no set is empty at q = 1
        assert cp.prediction_sets(t64(s), 1.0).numpy().any(1).all()


# ------------------------------------------------------------------ coverage guarantee


def synthetic(seed: int, n: int, c: int, model_scale: float):
    """Labels drawn from softmax(z); the model predicts softmax(model_scale * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 1.5
    true = scipy.special.softmax(z, -1)
    labels = (true.cumsum(1) > rng.random((n, 1))).argmax(1)
    return t64(scipy.special.softmax(model_scale * z, -1)), torch.from_numpy(labels)


@pytest.mark.parametrize("model_scale", [1.0, 3.0, 0.4])  # calibrated, over-, underconfident
def test_split_coverage_guarantee(model_scale):
    n, alpha = 2000, 0.1
    probs, labels = synthetic(int(model_scale * 10), n, 10, model_scale)
    out = cp.split_coverage(probs, labels, alpha, splits=200, seed=3)
    assert set(out) == set(cp.CLASS_SCORES)
    n_cal = n // 2
    for name, figures in out.items():
        assert set(figures) == {"coverage", "mean_size", "worst_class_coverage"}
        assert all(len(v) == 200 for v in figures.values())
        mean = float(np.mean(figures["coverage"]))
        assert 1 - alpha - 0.01 <= mean <= 1 - alpha + 1 / (n_cal + 1) + 0.01, (name, mean)
        assert 1 <= np.mean(figures["mean_size"]) < 10
        assert np.all(np.array(figures["worst_class_coverage"])
                      <= np.array(figures["coverage"]) + 1e-12)


def test_split_coverage_matches_manual_splits():
    n, alpha, splits, seed = 300, 0.2, 3, 7
    probs, labels = synthetic(1, n, 5, 2.0)
    out = cp.split_coverage(probs, labels, alpha, splits=splits, seed=seed,
                            calibration_fraction=0.4, lam=0.02, k_reg=1)
    u = cp.uniform_draws(n, seed + cp.RANDOM_SEED)
    generator = torch.Generator().manual_seed(seed)
    n_cal = 120
    y = labels.numpy()
    for i in range(splits):
        order = torch.randperm(n, generator=generator).numpy()
        cal, test = order[:n_cal], order[n_cal:]
        for name in cp.CLASS_SCORES:
            s = cp.class_scores(probs, name, u, lam=0.02, k_reg=1).numpy()
            q = ref_quantile(s[cal, y[cal]], alpha)
            sets = s[test] <= q
            assert out[name]["coverage"][i] == pytest.approx(sets[np.arange(len(test)),
                                                                  y[test]].mean(), abs=1e-12)
            assert out[name]["mean_size"][i] == pytest.approx(sets.sum(1).mean(), abs=1e-12)


# ---------------------------------------------------------------------- set metrics


def test_set_metrics_by_hand():
    sets = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    labels = torch.tensor([0, 1, 1, 2, 2])
    # covered: 1, 0, 1, 1, 1 ; sizes: 2, 0, 2, 3, 1
    got = cp.set_metrics(sets, labels)
    assert got["coverage"] == pytest.approx(0.8, abs=1e-15)
    assert got["mean_size"] == pytest.approx(1.6, abs=1e-15)
    assert got["empty"] == pytest.approx(0.2, abs=1e-15)
    assert got["class_coverage"] == [1.0, 0.5, 1.0]
    assert got["worst_class_coverage"] == 0.5
    assert got["size_counts"] == [1, 1, 2, 1]
    # a class that never occurs is None; counts reach size C
    got4 = cp.set_metrics(torch.cat([sets, torch.zeros(5, 1, dtype=torch.bool)], 1), labels,
                          num_classes=4)
    assert got4["class_coverage"] == [1.0, 0.5, 1.0, None]
    assert got4["worst_class_coverage"] == 0.5
    assert got4["size_counts"] == [1, 1, 2, 1, 0]


# ------------------------------------------------------------------------ regression


def test_regression_scores_and_interval_metrics_by_hand():
    mean, std, y = t64([0.0, 1.0, 2.0]), t64([1.0, 2.0, 0.5]), t64([1.0, -1.0, 2.25])
    np.testing.assert_allclose(cp.regression_scores(mean, std, y).numpy(), [1.0, 1.0, 0.5],
                               atol=1e-15)
    got = cp.interval_metrics(mean, std, y, 0.9)
    assert got["coverage"] == pytest.approx(1 / 3, abs=1e-15)
    assert got["mean_width"] == pytest.approx(2 * 0.9 * 3.5 / 3, abs=1e-12)
    assert cp.interval_metrics(mean, std, y, 1.0)["coverage"] == 1.0  # closed interval
    assert cp.interval_metrics(mean, std, y, 0.4)["coverage"] == 0.0
    # (N, D) inputs are flattened
    m2, s2, y2 = mean.reshape(3, 1).repeat(1, 2), std.reshape(3, 1).repeat(1, 2), y.reshape(3, 1)
    np.testing.assert_allclose(cp.regression_scores(m2, s2, y2.repeat(1, 2)).numpy(),
                               [1, 1, 1, 1, 0.5, 0.5], atol=1e-15)


def test_regression_scores_reject_non_positive_std():
    with pytest.raises(ValueError):
        cp.regression_scores(t64([0.0, 1.0]), t64([1.0, 0.0]), t64([0.0, 0.0]))
    with pytest.raises(ValueError):
        cp.interval_metrics(t64([0.0]), t64([-1.0]), t64([0.0]), 1.0)


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_gaussian_intervals_cover(alpha):
    rng = np.random.default_rng(int(alpha * 100))
    n, n_cal, splits = 2000, 1000, 200
    mu = rng.normal(size=n)
    sigma = rng.uniform(0.5, 2.0, size=n)
    y = mu + sigma * rng.normal(size=n)
    coverage, thresholds = [], []
    for _ in range(splits):
        order = rng.permutation(n)
        cal, test = order[:n_cal], order[n_cal:]
        q = cp.conformal_quantile(cp.regression_scores(t64(mu[cal]), t64(sigma[cal]),
                                                       t64(y[cal])), alpha)
        figures = cp.interval_metrics(t64(mu[test]), t64(sigma[test]), t64(y[test]), q)
        coverage.append(figures["coverage"])
        thresholds.append(q)
        assert figures["mean_width"] == pytest.approx(2 * q * sigma[test].mean(), rel=1e-12)
    mean = float(np.mean(coverage))
    assert 1 - alpha - 0.01 <= mean <= 1 - alpha + 1 / (n_cal + 1) + 0.01
    # the threshold estimates the normal quantile of |eps|
    assert float(np.mean(thresholds)) == pytest.approx(scipy.stats.norm.ppf(1 - alpha / 2),
                                                       abs=0.05)
