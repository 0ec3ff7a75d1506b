"""diverse.metrics: cross-checks against sklearn / torchmetrics / scipy, closed forms."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
    roc_curve,
)
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    multiclass_accuracy,
    multiclass_calibration_error,
)

from diverse import metrics as mt

TOL = 1e-6
SEEDS = (0, 1, 2)
GRID = list(itertools.product(SEEDS, (1, 3, 5), (2, 10)))  # (seed, M, C)
GRID_IDS = [f"seed{s}-M{m}-C{c}" for s, m, c in GRID]


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Inputs here are tiny; intra-op threads only add wake-up latency. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_probs(seed: int, m: int, c: int, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Member probabilities (M, N, C) from softmax of random logits of varied sharpness."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(1, n, 1, generator=g, dtype=torch.float64) * 4
    logits = torch.randn(m, n, c, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, c, (n,), generator=g)
    return logits.softmax(-1), labels


def one_hot_members(seed: int, m: int, c: int, n: int = 200) -> torch.Tensor:
    """One-hot members: p̄ takes values k/M, giving many exact ties."""
    g = torch.Generator().manual_seed(seed)
    votes = torch.randint(0, c, (m, n), generator=g)
    return torch.nn.functional.one_hot(votes, c).to(torch.float64)


def close(a: float | torch.Tensor, b: float | np.ndarray | torch.Tensor) -> bool:
    return bool(np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b), atol=TOL, rtol=0))


# ----------------------------------------------------------------- basic predictions


@pytest.mark.parametrize(("seed", "m", "c"), GRID, ids=GRID_IDS)
def test_basic_metrics_match_sklearn_and_torchmetrics(seed: int, m: int, c: int) -> None:
    probs, labels = random_probs(seed, m, c)
    pbar = probs.numpy().mean(0)
    y = labels.numpy()

    assert close(mt.mean_probs(probs), pbar)
    assert mt.mean_probs(probs).shape == (probs.shape[1], c)

    acc = mt.accuracy(probs, labels)
    assert acc.dim() == 0 and acc.dtype == torch.float64
    assert close(acc, accuracy_score(y, pbar.argmax(1)))
    tm_acc = multiclass_accuracy(torch.from_numpy(pbar), labels, num_classes=c, average="micro")
    assert close(acc, tm_acc)

    assert close(mt.nll(probs, labels), log_loss(y, pbar, labels=list(range(c))))
    sk_brier = brier_score_loss(y, pbar, labels=list(range(c)), scale_by_half=False)
    assert close(mt.brier(probs, labels), sk_brier)


def test_float32_input_is_computed_in_float64() -> None:
    probs, labels = random_probs(3, 3, 10)
    p32 = probs.float()
    assert mt.mean_probs(p32).dtype == torch.float64
    assert close(mt.nll(p32, labels), mt.nll(p32.double(), labels))


def test_nll_is_not_log_of_mean_probability_nor_mean_member_nll() -> None:
    probs, labels = random_probs(4, 5, 10)
    p_true = probs.gather(2, labels[None, :, None].expand(5, -1, 1)).squeeze(2)  # (M, N)
    proper = mt.nll(probs, labels)
    log_of_example_mean = -p_true.mean(0).mean().log()  # the reference-code bug
    mean_member_nll = -p_true.log().mean()
    # Jensen, strictly on non-degenerate data: bug < proper < average member NLL.
    assert log_of_example_mean < proper - 0.1
    assert proper < mean_member_nll - 0.01
    assert close(proper, -p_true.mean(0).log().mean())


@pytest.mark.parametrize(("seed", "m", "c"), GRID, ids=GRID_IDS)
def test_nll_from_logits_matches_nll_of_softmax(seed: int, m: int, c: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, 100, c, generator=g) * 3  # float32 on purpose
    labels = torch.randint(0, c, (100,), generator=g)
    assert close(mt.nll_from_logits(logits, labels), mt.nll(logits.double().softmax(-1), labels))


def test_nll_from_logits_is_stable_where_softmax_underflows() -> None:
    # Member log-probabilities of the true class (0): -2000 and -2001.
    logits = torch.tensor([[[0.0, 2000.0]], [[0.0, 2001.0]]])
    labels = torch.tensor([0])
    expected = -(scipy.special.logsumexp([-2000.0, -2001.0]) - math.log(2))
    assert close(mt.nll_from_logits(logits, labels), expected)
    # The probability route can only report the eps floor.
    assert close(mt.nll(logits.double().softmax(-1), labels), -math.log(1e-12))


# ------------------------------------------------------------------------ calibration


@pytest.mark.parametrize(("seed", "m", "c"), GRID, ids=GRID_IDS)
def test_ece_matches_torchmetrics(seed: int, m: int, c: int) -> None:
    probs, labels = random_probs(seed, m, c)
    pbar = probs.mean(0)
    for bins in (15, 7):
        ref = multiclass_calibration_error(pbar, labels, num_classes=c, n_bins=bins, norm="l1")
        assert close(mt.ece(probs, labels, bins=bins), ref)


def test_ece_boundary_confidence_goes_to_upper_bin_like_torchmetrics() -> None:
    # bins=4: 0.75 lies on a boundary and belongs to [0.75, 1], not [0.5, 0.75).
    probs = torch.tensor([[[0.75, 0.25], [0.6, 0.4]]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    # Upper: 0.5*|1 - 0.75| + 0.5*|0 - 0.6| = 0.425 (lower would give |0.5 - 0.675| = 0.175).
    assert close(mt.ece(probs, labels, bins=4), 0.425)
    ref = multiclass_calibration_error(probs[0], labels, num_classes=2, n_bins=4, norm="l1")
    assert close(ref, 0.425)


@pytest.mark.parametrize("bins", [4, 8, 16])
def test_ece_on_interior_boundaries_matches_torchmetrics(bins: int) -> None:
    # torchmetrics bins in float32: dyadic edges (and edge ± 2^-20) are exact there and here.
    edges = torch.arange(bins // 2, bins, dtype=torch.float64) / bins  # edges in [0.5, 1)
    conf = torch.cat([edges, edges[1:] - 2.0**-20, edges + 2.0**-20])
    g = torch.Generator().manual_seed(bins)
    labels = torch.randint(0, 2, (conf.numel(),), generator=g)
    probs = torch.stack([conf, 1 - conf], -1)[None]
    ref = multiclass_calibration_error(probs[0], labels, num_classes=2, n_bins=bins, norm="l1")
    assert close(mt.ece(probs, labels, bins=bins), ref)
    _, _, count = mt.reliability_diagram(probs, labels, bins=bins)
    # Each upper half bin holds its left edge, edge + 2^-20 and the next edge - 2^-20.
    assert count.tolist() == [0] * (bins // 2) + [3] * (bins // 2 - 1) + [2]


@pytest.mark.parametrize("bins", [7, 10, 15])
def test_binning_at_and_around_every_edge(bins: int) -> None:
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    inner = edges[(edges >= 0.5) & (edges < 1)]
    conf = torch.cat(
        [
            inner,
            torch.nextafter(inner, torch.tensor(0.0)),
            torch.nextafter(inner, torch.tensor(1.0)),
        ]
    ).clamp(0.5, 1)
    probs = torch.stack([conf, 1 - conf], -1)[None]
    _, _, count = mt.reliability_diagram(probs, torch.zeros(conf.numel(), dtype=torch.long), bins)
    # Oracle: the bin is the number of edges <= conf, minus one ([lo, hi) bins).
    index = (conf[:, None] >= edges[None, :]).sum(1) - 1
    assert count.tolist() == torch.bincount(index, minlength=bins).tolist()


def test_ece_counts_confidence_one_in_last_bin() -> None:
    # Guo et al.: both in [14/15, 1]: |0.5 - 0.975| = 0.475. torchmetrics <= 1.9 puts 1.0 in a
    # hidden extra bin (0.525; issue #3510); we deliberately do not.
    probs = torch.tensor([[[0.95, 0.05], [1.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    assert close(mt.ece(probs, labels), 0.475)
    _, _, count = mt.reliability_diagram(probs, labels)
    assert count.tolist() == [0] * 14 + [2]


def test_ece_and_ace_zero_for_perfectly_calibrated_bins() -> None:
    # 10 examples at confidence 0.7 with 7 correct, 10 at 0.9 with 9 correct.
    conf = torch.tensor([0.7] * 10 + [0.9] * 10, dtype=torch.float64)
    correct = torch.tensor([1] * 7 + [0] * 3 + [1] * 9 + [0] * 1)
    probs = torch.stack([conf, 1 - conf], -1)[None]
    labels = 1 - correct  # class 0 is predicted
    assert close(mt.ece(probs, labels), 0.0)
    assert close(mt.adaptive_ece(probs, labels, bins=2), 0.0)
    # ... and not zero once the labels are shuffled across the two levels.
    assert mt.ece(probs, labels.flip(0)) > 0.05


def test_ece_known_value_two_members() -> None:
    # p̄ rows: [0.9, 0.1] (y=0, correct) and [0.3, 0.7] (y=0, wrong; conf 0.7), 15 bins:
    # bins differ, so ECE = 0.5*|1 - 0.9| + 0.5*|0 - 0.7| = 0.4.
    probs = torch.tensor([[[1.0, 0.0], [0.6, 0.4]], [[0.8, 0.2], [0.0, 1.0]]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    assert close(mt.ece(probs, labels), 0.4)


def loop_reliability(conf: np.ndarray, correct: np.ndarray, bins: int) -> tuple[np.ndarray, ...]:
    """Oracle: one mask per bin, [lo, hi) with the last bin closed."""
    edges = np.linspace(0, 1, bins + 1)
    out_conf, out_acc, out_count = np.zeros(bins), np.zeros(bins), np.zeros(bins, dtype=int)
    for b in range(bins):
        upper = conf <= edges[b + 1] if b == bins - 1 else conf < edges[b + 1]
        mask = (conf >= edges[b]) & upper
        out_count[b] = mask.sum()
        if mask.any():
            out_conf[b], out_acc[b] = conf[mask].mean(), correct[mask].mean()
    return out_conf, out_acc, out_count


@pytest.mark.parametrize(("seed", "m", "c"), GRID, ids=GRID_IDS)
def test_reliability_diagram_matches_loop_and_is_consistent_with_ece(
    seed: int, m: int, c: int
) -> None:
    for probs, labels in (random_probs(seed, m, c), (one_hot_members(seed, m, c), None)):
        if labels is None:
            labels = torch.randint(
                0, c, (probs.shape[1],), generator=torch.Generator().manual_seed(seed)
            )
        bin_conf, bin_acc, bin_count = mt.reliability_diagram(probs, labels, bins=15)
        assert bin_conf.shape == bin_acc.shape == bin_count.shape == (15,)
        pbar = probs.mean(0).numpy()
        conf, correct = pbar.max(1), (pbar.argmax(1) == labels.numpy()).astype(float)
        ref_conf, ref_acc, ref_count = loop_reliability(conf, correct, 15)
        assert bin_count.tolist() == ref_count.tolist()
        assert close(bin_conf, ref_conf) and close(bin_acc, ref_acc)
        n = probs.shape[1]
        from_diagram = (bin_count / n * (bin_acc - bin_conf).abs()).sum()
        assert close(mt.ece(probs, labels), from_diagram)


def numpy_ace(pbar: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Oracle: np.array_split of the stable ascending order, weighted by group size."""
    conf = pbar.max(1)
    correct = pbar.argmax(1) == labels
    total = 0.0
    for group in np.array_split(np.argsort(conf, kind="stable"), bins):
        if len(group):
            total += len(group) / len(conf) * abs(correct[group].mean() - conf[group].mean())
    return total


@pytest.mark.parametrize(("seed", "m", "c"), GRID, ids=GRID_IDS)
def test_adaptive_ece_matches_numpy_oracle(seed: int, m: int, c: int) -> None:
    probs, labels = random_probs(seed, m, c, n=307)  # 307 = 15 * 20 + 7: uneven groups
    y = labels.numpy()
    for bins in (15, 4, 500):  # 500 > N: empty groups
        assert close(
            mt.adaptive_ece(probs, labels, bins), numpy_ace(probs.mean(0).numpy(), y, bins)
        )
    # Exact ties in confidence (p̄ on a 1/M grid): stable order decides the groups.
    tied = one_hot_members(seed, m, c, n=307)
    assert close(mt.adaptive_ece(tied, labels, 15), numpy_ace(tied.mean(0).numpy(), y, 15))


def test_adaptive_ece_hand_made() -> None:
    # Sorted confidences 0.6 (wrong), 0.7, 0.8, 0.9 (right), 0.95 (wrong); bins=2 -> 3 + 2.
    # Group 1: |2/3 - 0.7| * 3/5 = 0.02; group 2: |0.5 - 0.925| * 2/5 = 0.17.
    conf = torch.tensor([0.9, 0.6, 0.95, 0.8, 0.7], dtype=torch.float64)
    wrong = torch.tensor([0, 1, 1, 0, 0])
    probs = torch.stack([conf, 1 - conf], -1)[None]
    assert close(mt.adaptive_ece(probs, wrong, bins=2), 0.19)
    # Equal-width ECE of the same data differs (bins 9, 10, 12, 13, 14 of 15).
    assert not close(mt.ece(probs, wrong), 0.19)


# ------------------------------------------------------------------------ uncertainty


@pytest.mark.parametrize(("seed", "m", "c"), GRID, ids=GRID_IDS)
def test_entropies_match_scipy(seed: int, m: int, c: int) -> None:
    probs, _ = random_probs(seed, m, c)
    p = probs.numpy()
    h_pred = scipy.stats.entropy(p.mean(0), axis=1)
    h_exp = scipy.stats.entropy(p, axis=2).mean(0)
    assert close(mt.predictive_entropy(probs), h_pred)
    assert close(mt.expected_entropy(probs), h_exp)
    mi = mt.mutual_information(probs)
    assert mi.shape == (probs.shape[1],)
    assert close(mi, np.maximum(h_pred - h_exp, 0))
    assert bool((mi >= 0).all()) and bool((mi <= math.log(min(m, c)) + 1e-12).all())


def test_mutual_information_analytic() -> None:
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert close(mt.mutual_information(disagree), [math.log(2)])
    assert close(mt.predictive_entropy(disagree), [math.log(2)])
    assert close(mt.expected_entropy(disagree), [0.0])
    probs, _ = random_probs(5, 1, 10)
    same = probs.expand(3, -1, -1)
    assert bool((mt.mutual_information(same) >= 0).all())
    assert close(mt.mutual_information(same), 0.0)
    for c in (2, 10):
        uniform = torch.full((3, 4, c), 1.0 / c)
        assert close(mt.predictive_entropy(uniform), [math.log(c)] * 4)
        assert close(mt.expected_entropy(uniform), [math.log(c)] * 4)


def loop_disagreement(probs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Oracle: explicit loops over ordered member pairs and over members."""
    pred = probs.argmax(-1).numpy()
    ens = probs.mean(0).argmax(-1).numpy()
    m, n = pred.shape
    pair = np.zeros(n)
    for i in range(m):
        for j in range(m):
            if i != j:
                pair += pred[i] != pred[j]
    pair = pair / (m * (m - 1)) if m > 1 else pair
    with_mean = np.mean([pred[i] != ens for i in range(m)], axis=0)
    return pair, with_mean


@pytest.mark.parametrize(("seed", "m", "c"), GRID, ids=GRID_IDS)
def test_disagreement_matches_loop(seed: int, m: int, c: int) -> None:
    for probs in (random_probs(seed, m, c)[0], one_hot_members(seed, m, c)):
        pair, with_mean = loop_disagreement(probs)
        assert close(mt.disagreement(probs), pair)
        assert close(mt.disagreement_with_mean(probs), with_mean)


def test_disagreement_analytic() -> None:
    two = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    assert close(mt.disagreement(two), [1.0])
    votes_aab = torch.tensor([[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]]])
    assert close(mt.disagreement(votes_aab), [4 / 6])  # 4 of 6 ordered pairs differ
    assert close(mt.disagreement_with_mean(votes_aab), [1 / 3])
    assert close(mt.disagreement(votes_aab[:1]), [0.0])  # M = 1
    assert close(mt.disagreement_with_mean(votes_aab[:1]), [0.0])


# ---------------------------------------------------------------------- OOD detection


def sklearn_ood(s_in: np.ndarray, s_out: np.ndarray) -> dict[str, float]:
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    s = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(y, s),
        "aupr_out": average_precision_score(y, s),
        "aupr_in": average_precision_score(1 - y, -s),
        "fpr95": fpr[np.argmax(tpr >= 0.95)],
    }


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_ood_detection_matches_sklearn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    n, k = rng.integers(20, 300, size=2)
    s_in, s_out = rng.uniform(0, 1, n), rng.uniform(0.2, 1.2, k) / 1.2
    if ties:
        s_in, s_out = np.round(s_in, 1), np.round(s_out, 1)
    out = mt.ood_detection(torch.from_numpy(s_in), torch.from_numpy(s_out))
    assert set(out) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    assert all(isinstance(v, float) for v in out.values())
    ref = sklearn_ood(s_in, s_out)
    for key in ref:
        assert close(out[key], ref[key]), key
    # torchmetrics agrees on the threshold-free AUROC / AP (scores in [0, 1]).
    s = torch.from_numpy(np.r_[s_in, s_out])
    y = torch.cat([torch.zeros(n), torch.ones(k)]).long()
    assert close(out["auroc"], binary_auroc(s, y))
    assert close(out["aupr_out"], binary_average_precision(s, y))


def test_ood_detection_fpr95_with_ties_at_the_threshold() -> None:
    # 20 OOD scores: 18 at 2.0 and 2 at 1.0; reaching TPR >= 0.95 needs threshold 1.0,
    # where 3 of the 4 in-distribution examples (1.0, 1.0, 1.5) are also flagged.
    s_out = torch.tensor([2.0] * 18 + [1.0] * 2)
    s_in = torch.tensor([0.0, 1.0, 1.0, 1.5])
    out = mt.ood_detection(s_in, s_out)
    assert close(out["fpr95"], 0.75)
    assert close(out["fpr95"], sklearn_ood(s_in.numpy(), s_out.numpy())["fpr95"])


def test_ood_detection_analytic() -> None:
    low, high = torch.linspace(0, 1, 50), torch.linspace(2, 3, 30)
    sep = mt.ood_detection(low, high)
    assert sep == pytest.approx({"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0})
    rev = mt.ood_detection(high, low)  # OOD scores below all in-distribution scores
    assert close(rev["auroc"], 0.0) and close(rev["fpr95"], 1.0)
    const = mt.ood_detection(torch.zeros(30), torch.zeros(10))  # indistinguishable
    assert const == pytest.approx({"auroc": 0.5, "aupr_in": 0.75, "aupr_out": 0.25, "fpr95": 1.0})


def test_ood_detection_symmetries() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 8, (40,), generator=g).double()
    b = torch.randint(2, 10, (25,), generator=g).double()
    ab, ba = mt.ood_detection(a, b), mt.ood_detection(b, a)
    assert close(ab["auroc"], 1 - ba["auroc"])
    # aupr_in is aupr_out with the roles swapped and the score negated.
    assert close(ab["aupr_in"], mt.ood_detection(-b, -a)["aupr_out"])


@pytest.mark.parametrize("score", ["entropy", "mutual_information"])
def test_ood_metrics_uses_named_score(score: str) -> None:
    p_in, _ = random_probs(0, 3, 10, n=80)
    sharp, _ = random_probs(1, 3, 10, n=60)
    fn = mt.predictive_entropy if score == "entropy" else mt.mutual_information
    out = mt.ood_metrics(p_in, sharp, score=score)
    assert out == mt.ood_detection(fn(p_in), fn(sharp))
    ref = sklearn_ood(fn(p_in).numpy(), fn(sharp).numpy())
    assert all(close(out[key], ref[key]) for key in ref)


def test_ood_metrics_rejects_unknown_score_and_mismatch() -> None:
    p, _ = random_probs(0, 3, 10, n=20)
    with pytest.raises(ValueError, match="entropy.*mutual_information"):
        mt.ood_metrics(p, p, score="max_prob")
    with pytest.raises(ValueError, match="agree in M and C"):
        mt.ood_metrics(p, p[:2])


def test_classification_metrics_summary() -> None:
    probs, labels = random_probs(7, 5, 10)
    out = mt.classification_metrics(probs, labels)
    expected = {
        "accuracy": mt.accuracy(probs, labels),
        "nll": mt.nll(probs, labels),
        "brier": mt.brier(probs, labels),
        "ece": mt.ece(probs, labels),
        "ace": mt.adaptive_ece(probs, labels),
        "predictive_entropy": mt.predictive_entropy(probs).mean(),
        "expected_entropy": mt.expected_entropy(probs).mean(),
        "mutual_information": mt.mutual_information(probs).mean(),
        "disagreement": mt.disagreement(probs).mean(),
    }
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert isinstance(out[key], float) and close(out[key], value), key


# -------------------------------------------------------------------------- regression


def random_regression(
    seed: int, m: int, shape: tuple[int, ...] = (200,)
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(m, *shape, generator=g, dtype=torch.float64)
    stds = torch.rand(m, *shape, generator=g, dtype=torch.float64) + 0.2
    targets = torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5
    return means, stds, targets


def scipy_regression(mu: np.ndarray, sd: np.ndarray, y: np.ndarray) -> dict[str, float]:
    m = mu.shape[0]
    logp = scipy.stats.norm.logpdf(y, loc=mu, scale=sd)
    pit = scipy.stats.norm.cdf(y, loc=mu, scale=sd).mean(0)
    levels = np.linspace(0.05, 0.95, 19)
    return {
        "rmse": float(np.sqrt(np.mean((mu.mean(0) - y) ** 2))),
        "nll": float(-np.mean(scipy.special.logsumexp(logp, axis=0) - np.log(m))),
        "calibration_error": float(np.mean([abs(q - np.mean(pit <= q)) for q in levels])),
        # E[y²] - E[y]² of the mixture, an independent route to the total variance.
        "mean_std": float(np.sqrt((sd**2 + mu**2).mean(0) - mu.mean(0) ** 2).mean()),
    }


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("m", [1, 3, 5])
def test_regression_metrics_match_scipy(seed: int, m: int) -> None:
    means, stds, targets = random_regression(seed, m)
    out = mt.regression_metrics(means, stds, targets)
    ref = scipy_regression(means.numpy(), stds.numpy(), targets.numpy())
    assert set(out) == set(ref)
    for key in ref:
        assert close(out[key], ref[key]), key
    assert mt.predictive_std(means, stds).shape == (200,)
    assert mt.rmse(means, targets).dim() == 0


def test_regression_multi_output_is_flattened() -> None:
    means, stds, targets = random_regression(0, 3, shape=(50, 4))
    flat = mt.regression_metrics(means.reshape(3, -1), stds.reshape(3, -1), targets.reshape(-1))
    assert mt.regression_metrics(means, stds, targets) == pytest.approx(flat, abs=1e-12)
    assert mt.predictive_std(means, stds).shape == (50, 4)


def test_regression_analytic() -> None:
    # Targets at the mean: every PIT is exactly 0.5, so the empirical CDF jumps at q = 0.5:
    # Σ_{q<0.5} q + Σ_{q>=0.5} (1 - q) = 2.25 + 2.75 over 19 levels.
    means, stds = torch.zeros(1, 10), torch.ones(1, 10)
    assert close(mt.regression_calibration_error(means, stds, torch.zeros(10)), 5.0 / 19)
    # Two members, one 40 sd above the target (Φ = 0) and one at it: every PIT is 0.25, a
    # level itself, which counts as covered (u <= q): (0.5 + 6.0) / 19.
    means = torch.tensor([[40.0] * 10, [0.0] * 10])
    u_quarter = mt.regression_calibration_error(means, torch.ones(2, 10), torch.zeros(10))
    assert close(u_quarter, 6.5 / 19)
    # Bimodal mixture ±a with unit stds, target in the middle: NLL = log(2π)/2 + a²/2.
    a = 3.0
    means2 = torch.tensor([[a], [-a]])
    assert close(
        mt.gaussian_mixture_nll(means2, torch.ones(2, 1), torch.zeros(1)),
        0.5 * math.log(2 * math.pi) + a * a / 2,
    )
    assert close(mt.predictive_std(means2, torch.ones(2, 1)), [math.sqrt(1 + a * a)])
    # Far-away target: logsumexp keeps the NLL finite and exact.
    far = mt.gaussian_mixture_nll(torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([100.0]))
    assert close(far, 0.5 * math.log(2 * math.pi) + 5000.0)


def test_regression_calibration_calibrated_vs_overconfident() -> None:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(1, 20000, generator=g, dtype=torch.float64)
    stds = torch.full_like(means, 0.5)
    targets = means[0] + 0.5 * torch.randn(20000, generator=g, dtype=torch.float64)
    assert mt.regression_calibration_error(means, stds, targets) < 0.01
    assert mt.regression_calibration_error(means, stds / 4, targets) > 0.1


# -------------------------------------------------------------------------- validation


def test_classification_input_validation() -> None:
    probs, labels = random_probs(0, 3, 4, n=10)
    with pytest.raises(ValueError, match=r"\(M, N, C\).*unsqueeze"):
        mt.accuracy(probs[0], labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        mt.nll(probs, labels[:5])
    with pytest.raises(ValueError, match="lie in"):
        mt.brier(probs, labels + 4)
    with pytest.raises(ValueError, match="integer"):
        mt.ece(probs, labels.double())
    with pytest.raises(ValueError, match="logits"):
        mt.predictive_entropy(torch.log(probs))
    with pytest.raises(ValueError, match="bins"):
        mt.ece(probs, labels, bins=0)
    with pytest.raises(ValueError, match="logits must have shape"):
        mt.nll_from_logits(probs[0], labels)


def test_ood_and_regression_input_validation() -> None:
    with pytest.raises(ValueError, match="empty"):
        mt.ood_detection(torch.zeros(0), torch.ones(3))
    with pytest.raises(ValueError, match="1-d"):
        mt.ood_detection(torch.zeros(3, 1), torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        mt.ood_detection(torch.tensor([0.0, float("nan")]), torch.ones(3))
    means, stds, targets = random_regression(0, 3, shape=(10,))
    with pytest.raises(ValueError, match="stds must have the shape"):
        mt.gaussian_mixture_nll(means, stds[:2], targets)
    with pytest.raises(ValueError, match="targets must have shape"):
        mt.rmse(means, targets[:5])
    with pytest.raises(ValueError, match="strictly positive"):
        mt.regression_calibration_error(means, -stds, targets)
    with pytest.raises(ValueError, match=r"\(M, N\) or \(M, N, D\)"):
        mt.rmse(means[0], targets)


def test_metrics_accept_numpy_arrays():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, 4, generator=g, dtype=torch.float64)
    probs, labels = logits.softmax(-1), torch.randint(0, 4, (20,), generator=g)
    p_np, y_np = probs.numpy(), labels.numpy()
    assert mt.classification_metrics(p_np, y_np) == mt.classification_metrics(
        probs, labels)
    assert torch.equal(mt.nll_from_logits(logits.numpy(), y_np),
                       mt.nll_from_logits(logits, labels))
    torch.testing.assert_close(mt.mutual_information(p_np), mt.mutual_information(probs))
    s_in, s_out = np.linspace(0, 1, 10), np.linspace(0.5, 2, 7)
    assert mt.ood_detection(s_in, s_out) == mt.ood_detection(torch.from_numpy(s_in),
                                                                       torch.from_numpy(s_out))
    means, stds, y = np.zeros((2, 5)), np.ones((2, 5)), np.arange(5.0)
    assert mt.regression_metrics(means, stds, y) == mt.regression_metrics(
        torch.from_numpy(means), torch.from_numpy(stds), torch.from_numpy(y))
