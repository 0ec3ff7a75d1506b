"""Evaluation metrics for ensembles: pure functions on tensors.

Conventions
-----------
* Classification: member probabilities ``probs`` have shape ``(M, N, C)`` (``M`` members,
  ``N`` examples, ``C`` classes; every row sums to 1) and ``labels`` have shape ``(N,)``
  (integer class indices). An ensemble of one is ``probs.unsqueeze(0)``.
* Regression: member means and standard deviations ``(M, N)`` with targets ``(N,)``, or
  ``(M, N, D)`` with targets ``(N, D)``; see :func:`rmse` for how ``D`` is handled.
* Inputs may be tensors or NumPy arrays (converted without a copy where possible).
* Everything is computed in float64 on the input's device. Scalar metrics return 0-dim
  tensors, per-example scores return ``(N,)`` tensors, the ``*_metrics`` summaries and
  :func:`ood_detection` return ``dict[str, float]``.
* Logarithms are natural (entropies in nats).
* ``argmax`` ties resolve to the lowest class index (``torch.argmax``, ``np.argmax``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "adaptive_ece",
    "brier",
    "classification_metrics",
    "disagreement",
    "disagreement_with_mean",
    "ece",
    "expected_entropy",
    "gaussian_mixture_nll",
    "mean_probs",
    "mutual_information",
    "nll",
    "nll_from_logits",
    "ood_detection",
    "ood_metrics",
    "predictive_entropy",
    "predictive_std",
    "regression_calibration_error",
    "regression_metrics",
    "reliability_diagram",
    "rmse",
]

_PROB_ATOL = 1e-3  # tolerance on "rows sum to 1" (float32/float16 softmax outputs pass)


# --------------------------------------------------------------------------- validation


def _tensor(x: Any) -> Any:
    """A NumPy array as a tensor (no copy); anything else unchanged."""
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def _check_probs(probs: Tensor, name: str = "probs") -> Tensor:
    """Validate member probabilities ``(M, N, C)`` and return them as float64."""
    probs = _tensor(probs)
    if not isinstance(probs, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if probs.dim() != 3:
        hint = " (for a single model use probs.unsqueeze(0))" if probs.dim() == 2 else ""
        raise ValueError(
            f"{name} must have shape (M, N, C) = (members, examples, classes), "
            f"got shape {tuple(probs.shape)}{hint}"
        )
    if probs.shape[0] < 1 or probs.shape[2] < 1:
        raise ValueError(
            f"{name} needs at least one member and one class, got {tuple(probs.shape)}"
        )
    p = probs.to(torch.float64)
    if p.numel() > 0:
        bad_range = bool(((p < 0) | (p > 1) | torch.isnan(p)).any())
        bad_sum = bool(((p.sum(-1) - 1).abs() > _PROB_ATOL).any())
        if bad_range or bad_sum:
            raise ValueError(
                f"{name} must hold probabilities in [0, 1] (no NaN) whose rows sum to 1 (within "
                f"{_PROB_ATOL}); got values in [{p.min().item():.4g}, {p.max().item():.4g}] "
                "-- did you pass logits? (use nll_from_logits or softmax first)"
            )
    return p


def _check_labels(labels: Tensor, n: int, c: int) -> Tensor:
    """Validate integer labels ``(N,)`` with values in ``[0, C)``."""
    labels = _tensor(labels)
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape (N,) = ({n},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if n > 0 and bool(((labels < 0) | (labels >= c)).any()):
        raise ValueError(
            f"labels must lie in [0, {c}) for C = {c} classes; "
            f"got values in [{labels.min().item()}, {labels.max().item()}]"
        )
    return labels.to(torch.int64)


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")


def _check_nonempty(n: int) -> None:
    if n == 0:
        raise ValueError("metrics need at least one example (N = 0)")


# ------------------------------------------------------------------- basic predictions


def mean_probs(probs: Tensor) -> Tensor:
    """Ensemble predictive distribution ``p̄ = (1/M) Σ_m p_m``.

    Args:
        probs: member probabilities ``(M, N, C)``.

    Returns:
        ``(N, C)`` float64.
    """
    return _check_probs(probs).mean(0)


def accuracy(probs: Tensor, labels: Tensor) -> Tensor:
    """Accuracy of the ensemble prediction ``argmax_c p̄_nc``.

    ``acc = (1/N) Σ_n 1[argmax_c p̄_nc = y_n]``.

    Args:
        probs: ``(M, N, C)``. labels: ``(N,)``.

    Returns:
        0-dim float64.
    """
    pbar = mean_probs(probs)
    y = _check_labels(labels, pbar.shape[0], pbar.shape[1])
    _check_nonempty(pbar.shape[0])
    return (pbar.argmax(-1) == y).to(torch.float64).mean()


def nll(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> Tensor:
    """Negative log-likelihood of the ensemble predictive distribution.

    ``NLL = -(1/N) Σ_n log max(p̄(y_n | x_n), eps)`` with ``p̄ = (1/M) Σ_m p_m``.

    This is the log of the *member-averaged* probability, averaged over examples. Two
    quantities that are sometimes reported under the same name are different:

    * ``-log((1/N) Σ_n p̄(y_n | x_n))``, minus the log of the probability averaged over
      *examples* (a known bug of a reference implementation). By Jensen it is never larger
      than the NLL above and can understate it by a lot (one example with
      ``p̄(y) -> 0`` sends the NLL to infinity but barely moves the example mean).
    * ``-(1/(M N)) Σ_m Σ_n log p_m(y_n | x_n)``, the average member NLL. By Jensen it is
      never smaller than the ensemble NLL; it scores the members, not the ensemble.

    ``eps`` only guards ``log 0``; use :func:`nll_from_logits` when logits are available.

    Args:
        probs: ``(M, N, C)``. labels: ``(N,)``. eps: floor on ``p̄(y_n)``.

    Returns:
        0-dim float64.
    """
    pbar = mean_probs(probs)
    y = _check_labels(labels, pbar.shape[0], pbar.shape[1])
    _check_nonempty(pbar.shape[0])
    p_true = pbar.gather(1, y[:, None]).squeeze(1)
    return -p_true.clamp_min(eps).log().mean()


def nll_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Ensemble NLL from member logits, computed stably.

    ``log p̄(y | x) = logsumexp_m log_softmax(z_m)_y - log M`` and
    ``NLL = -(1/N) Σ_n log p̄(y_n | x_n)``; equals :func:`nll` on ``softmax(logits)``
    but stays exact where the softmax underflows.

    Args:
        logits: ``(M, N, C)``. labels: ``(N,)``.

    Returns:
        0-dim float64.
    """
    logits = _tensor(logits)
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape (M, N, C), got {shape}")
    m, n, c = logits.shape
    if m < 1 or c < 1:
        raise ValueError(f"logits need at least one member and one class, got {(m, n, c)}")
    y = _check_labels(labels, n, c)
    _check_nonempty(n)
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)  # (M, N, C)
    logp_true = logp.gather(2, y[None, :, None].expand(m, n, 1)).squeeze(2)  # (M, N)
    log_pbar = torch.logsumexp(logp_true, dim=0) - math.log(m)
    return -log_pbar.mean()


def brier(probs: Tensor, labels: Tensor) -> Tensor:
    """Multiclass Brier score of the ensemble predictive distribution.

    ``BS = (1/N) Σ_n Σ_c (p̄_nc - 1[c = y_n])²``, in ``[0, 2]`` (sum over classes, no
    halving; for ``C = 2`` it is twice the usual binary Brier score).

    Args:
        probs: ``(M, N, C)``. labels: ``(N,)``.

    Returns:
        0-dim float64.
    """
    pbar = mean_probs(probs)
    y = _check_labels(labels, pbar.shape[0], pbar.shape[1])
    _check_nonempty(pbar.shape[0])
    onehot = torch.nn.functional.one_hot(y, pbar.shape[1]).to(torch.float64)
    return (pbar - onehot).pow(2).sum(-1).mean()


# ------------------------------------------------------------------------- calibration


def _confidence_correct(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence ``max_c p̄_nc`` and correctness ``1[argmax p̄_n = y_n]``, (N,)."""
    pbar = mean_probs(probs)
    y = _check_labels(labels, pbar.shape[0], pbar.shape[1])
    _check_nonempty(pbar.shape[0])
    conf, pred = pbar.max(-1)
    return conf, (pred == y).to(torch.float64)


def _binned(conf: Tensor, correct: Tensor, bin_index: Tensor, bins: int) -> tuple[Tensor, ...]:
    """Per-bin mean confidence, accuracy (0 for empty bins) and count (int64), each (bins,)."""
    count = torch.zeros(bins, dtype=torch.float64, device=conf.device)
    count.scatter_add_(0, bin_index, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).scatter_add_(0, bin_index, conf)
    acc_sum = torch.zeros_like(count).scatter_add_(0, bin_index, correct)
    denom = count.clamp_min(1)
    return conf_sum / denom, acc_sum / denom, count.to(torch.int64)


def reliability_diagram(
    probs: Tensor, labels: Tensor, bins: int = 15
) -> tuple[Tensor, Tensor, Tensor]:
    """Equal-width reliability diagram of the top-label confidence of ``p̄``.

    Bin ``b`` (of ``B = bins``) holds the examples with confidence ``s_n = max_c p̄_nc`` in
    ``[b/B, (b+1)/B)``; the last bin is closed, ``[(B-1)/B, 1]``. Boundaries are the
    float64 ``torch.linspace(0, 1, B + 1)`` and a confidence equal to an interior boundary
    goes to the upper bin (as ``torch.bucketize(..., right=True)`` in torchmetrics).

    Args:
        probs: ``(M, N, C)``. labels: ``(N,)``. bins: number of bins ``B``.

    Returns:
        ``(bin_confidence, bin_accuracy, bin_count)``, each ``(B,)``: mean confidence and
        accuracy of the examples in each bin (0.0 where the bin is empty; mask plots with
        ``bin_count > 0``) and the number of examples (int64).
        ``ece(probs, labels, B) == Σ_b bin_count_b / N · |bin_accuracy_b - bin_confidence_b|``.
    """
    _check_bins(bins)
    conf, correct = _confidence_correct(probs, labels)
    boundaries = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=conf.device)
    # Departure from torchmetrics (<= 1.9): there, bucketize(right=True) - 1 sends a
    # confidence of exactly 1.0 to a hidden (B+1)-th bin of its own (torchmetrics issue
    # #3510). Softmax saturates to exactly 1.0 in float32, so we clamp it into the last bin
    # as in Guo et al. (2017). (torchmetrics also bins in float32; see `ece`.)
    index = (torch.bucketize(conf, boundaries, right=True) - 1).clamp_(0, bins - 1)
    bin_conf, bin_acc, bin_count = _binned(conf, correct, index, bins)
    return bin_conf, bin_acc, bin_count


def ece(probs: Tensor, labels: Tensor, bins: int = 15) -> Tensor:
    """Expected calibration error with equal-width confidence bins (Guo et al., 2017).

    ``ECE = Σ_b (n_b / N) |acc_b - conf_b|`` over the ``B`` bins of
    :func:`reliability_diagram` on the top-label confidence ``max_c p̄_nc``.

    Equals ``torchmetrics`` ``MulticlassCalibrationError(num_classes=C, n_bins=B,
    norm="l1")`` up to round-off, with the same rule on interior bin boundaries (a
    confidence on an edge goes to the upper bin). Two differences: (1) a confidence of
    exactly 1.0, which torchmetrics counts in an extra bin of its own and we count in the
    last bin (see :func:`reliability_diagram`); (2) torchmetrics casts confidences to
    float32 and bins against float32 edges, we bin in float64, so a confidence within
    ~1e-7 of a non-dyadic edge (e.g. ``k/15``) may fall on the other side.

    Args:
        probs: ``(M, N, C)``. labels: ``(N,)``. bins: number of bins ``B``.

    Returns:
        0-dim float64.
    """
    bin_conf, bin_acc, bin_count = reliability_diagram(probs, labels, bins)
    weight = bin_count.to(torch.float64) / bin_count.sum()
    return (weight * (bin_acc - bin_conf).abs()).sum()


def adaptive_ece(probs: Tensor, labels: Tensor, bins: int = 15) -> Tensor:
    """Adaptive (equal-mass) calibration error, top-label form of ACE (Nixon et al., 2019).

    Confidences ``s_n = max_c p̄_nc`` are sorted ascending with a *stable* sort (ties keep
    their example order) and the sorted order is cut into ``B`` consecutive groups exactly
    as ``np.array_split(order, B)``: the first ``N mod B`` groups hold ``⌊N/B⌋ + 1``
    examples, the rest ``⌊N/B⌋`` (groups are empty when ``N < B``). Then

    ``ACE = Σ_b (n_b / N) |acc_b - conf_b|``.

    Departures from the paper: Nixon et al. average over all classes (class-wise ranges)
    with equal weights ``1/B`` per range; we use the top label only (like ECE) and weight
    by ``n_b / N``, which equals ``1/B`` when ``B`` divides ``N``.

    Args:
        probs: ``(M, N, C)``. labels: ``(N,)``. bins: number of groups ``B``.

    Returns:
        0-dim float64.
    """
    _check_bins(bins)
    conf, correct = _confidence_correct(probs, labels)
    n = conf.shape[0]
    order = torch.sort(conf, stable=True).indices
    # np.array_split(range(n), bins): the first r groups hold q + 1, the rest q.
    q, r = divmod(n, bins)
    position = torch.arange(n, device=conf.device)
    big = r * (q + 1)  # sorted positions [0, big) lie in the r larger groups
    index = torch.where(position < big, position // (q + 1), r + (position - big) // max(q, 1))
    bin_conf, bin_acc, bin_count = _binned(conf[order], correct[order], index, bins)
    weight = bin_count.to(torch.float64) / n
    return (weight * (bin_acc - bin_conf).abs()).sum()


# ------------------------------------------------------------------------ uncertainty


def _entropy(p: Tensor) -> Tensor:
    """``H[p] = -Σ_c p_c log p_c`` over the last axis, with ``0 log 0 = 0``."""
    return -torch.special.xlogy(p, p).sum(-1)


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy of the ensemble predictive ``H[p̄_n] = -Σ_c p̄_nc log p̄_nc`` (nats).

    Total uncertainty; ``log C`` for a uniform ``p̄``.

    Args:
        probs: ``(M, N, C)``.

    Returns:
        ``(N,)`` float64.
    """
    return _entropy(mean_probs(probs))


def expected_entropy(probs: Tensor) -> Tensor:
    """Average member entropy ``(1/M) Σ_m H[p_mn]`` (aleatoric part, nats).

    Args:
        probs: ``(M, N, C)``.

    Returns:
        ``(N,)`` float64.
    """
    return _entropy(_check_probs(probs)).mean(0)


def mutual_information(probs: Tensor) -> Tensor:
    """Mutual information between label and member, ``H[p̄_n] - (1/M) Σ_m H[p_mn]``.

    Epistemic part (BALD, Houlsby et al. 2011); ``0`` when members agree, ``log 2`` for two
    members with disagreeing one-hot predictions. Clamped at 0 against round-off.

    Args:
        probs: ``(M, N, C)``.

    Returns:
        ``(N,)`` float64.
    """
    p = _check_probs(probs)
    mi = _entropy(p.mean(0)) - _entropy(p).mean(0)
    return mi.clamp_min(0.0)


def disagreement(probs: Tensor) -> Tensor:
    """Average pairwise disagreement of member predictions.

    ``d_n = 1/(M(M-1)) Σ_{m≠k} 1[argmax p_mn ≠ argmax p_kn]``, over ordered pairs. With
    ``c_nj`` members voting for class ``j`` this is ``(M² - Σ_j c_nj²) / (M(M-1))``.
    ``0`` for ``M = 1``.

    Args:
        probs: ``(M, N, C)``.

    Returns:
        ``(N,)`` float64.
    """
    p = _check_probs(probs)
    m, _, c = p.shape
    if m == 1:
        return torch.zeros(p.shape[1], dtype=torch.float64, device=p.device)
    votes = torch.nn.functional.one_hot(p.argmax(-1), c).sum(0).to(torch.float64)  # (N, C)
    return (m * m - votes.pow(2).sum(-1)) / (m * (m - 1))


def disagreement_with_mean(probs: Tensor) -> Tensor:
    """Fraction of members whose prediction differs from the ensemble's.

    ``(1/M) Σ_m 1[argmax p_mn ≠ argmax p̄_n]``.

    Args:
        probs: ``(M, N, C)``.

    Returns:
        ``(N,)`` float64.
    """
    p = _check_probs(probs)
    return (p.argmax(-1) != p.mean(0).argmax(-1)).to(torch.float64).mean(0)


# ---------------------------------------------------------------------- OOD detection


def _check_scores(score: Tensor, name: str) -> Tensor:
    score = _tensor(score)
    if not isinstance(score, Tensor) or score.dim() != 1:
        shape = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
        raise ValueError(f"{name} must be a 1-d tensor of scores, got {shape}")
    if score.shape[0] == 0:
        raise ValueError(f"{name} is empty; OOD metrics need examples on both sides")
    s = score.detach().to(torch.float64)
    if bool(torch.isnan(s).any()):
        raise ValueError(f"{name} contains NaN")
    return s


def _clf_curve(score: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative false/true positive counts at each distinct threshold, descending.

    Entry ``k`` counts the examples with ``score >= t_k`` where ``t_0 > t_1 > ...`` are the
    distinct scores; tied scores enter together (as sklearn's ``_binary_clf_curve``).
    """
    s, order = torch.sort(score, descending=True, stable=True)
    pos = positive[order].to(torch.float64)
    last_of_run = torch.ones_like(s, dtype=torch.bool)
    last_of_run[:-1] = s[1:] != s[:-1]
    tps = pos.cumsum(0)[last_of_run]
    fps = (1 - pos).cumsum(0)[last_of_run]
    return fps, tps


def _auroc(fps: Tensor, tps: Tensor) -> float:
    """Trapezoidal area under ``(FPR, TPR)`` from the origin (ties give diagonal steps)."""
    zero = fps.new_zeros(1)
    fpr = torch.cat([zero, fps / fps[-1]])
    tpr = torch.cat([zero, tps / tps[-1]])
    return float(torch.trapezoid(tpr, fpr))


def _average_precision(fps: Tensor, tps: Tensor) -> float:
    """Step-wise AP ``Σ_k (R_k - R_{k-1}) P_k`` (sklearn's, no interpolation)."""
    recall = tps / tps[-1]
    precision = tps / (tps + fps)
    delta = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((delta * precision).sum())


def ood_detection(score_in: Tensor, score_out: Tensor) -> dict[str, float]:
    """Threshold-free OOD detection metrics; a HIGHER score means "more likely OOD".

    With OOD examples as positives and scores thresholded at every distinct value
    (ties enter together, as in sklearn):

    * ``auroc``: area under the ROC curve (= ``sklearn.metrics.roc_auc_score``; a tie
      between an in- and an out-example counts 1/2).
    * ``aupr_out``: average precision ``Σ_k (R_k - R_{k-1}) P_k`` with OOD positive
      (= ``sklearn.metrics.average_precision_score``).
    * ``aupr_in``: the same with in-distribution positive and score ``-s``.
    * ``fpr95``: the smallest false-positive rate (fraction of in-distribution examples
      with ``s >= t``) over thresholds ``t`` detecting at least 95% of OOD examples
      (TPR ``>= 0.95``), i.e. ``fpr[tpr >= 0.95][0]`` on
      ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``. (With the default
      ``drop_intermediate=True`` sklearn may drop the point where TPR first reaches 0.95
      when it lies on a straight diagonal segment, which overstates FPR95.)

    Args:
        score_in: ``(N,)`` scores of in-distribution examples.
        score_out: ``(K,)`` scores of OOD examples.

    Returns:
        ``{"auroc", "aupr_in", "aupr_out", "fpr95"}`` as Python floats.
    """
    s_in = _check_scores(score_in, "score_in")
    s_out = _check_scores(score_out, "score_out").to(s_in.device)
    score = torch.cat([s_in, s_out])
    is_out = torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)]).bool()

    fps, tps = _clf_curve(score, is_out)
    fps_in, tps_in = _clf_curve(-score, ~is_out)
    n_out = s_out.shape[0]
    # TPR >= 0.95  <=>  20 * tps >= 19 * K, exact on integer counts (tps are whole numbers).
    reach = torch.nonzero(20 * tps >= 19 * n_out)[0, 0]
    return {
        "auroc": _auroc(fps, tps),
        "aupr_in": _average_precision(fps_in, tps_in),
        "aupr_out": _average_precision(fps, tps),
        "fpr95": float(fps[reach] / fps[-1]),
    }


_OOD_SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "entropy": predictive_entropy,
    "mutual_information": mutual_information,
}


def ood_metrics(probs_in: Tensor, probs_out: Tensor, score: str = "entropy") -> dict[str, float]:
    """OOD detection metrics of an uncertainty score computed from member probabilities.

    ``score="entropy"`` uses :func:`predictive_entropy`, ``"mutual_information"`` uses
    :func:`mutual_information`; then :func:`ood_detection`.

    Args:
        probs_in: ``(M, N, C)`` on in-distribution data.
        probs_out: ``(M, K, C)`` on OOD data (same ``M`` and ``C``).
        score: name of the score.

    Returns:
        ``{"auroc", "aupr_in", "aupr_out", "fpr95"}`` as Python floats.
    """
    if score not in _OOD_SCORES:
        raise ValueError(f"unknown OOD score {score!r}; allowed: {sorted(_OOD_SCORES)}")
    p_in = _check_probs(probs_in, "probs_in")
    p_out = _check_probs(probs_out, "probs_out")
    if p_in.shape[0] != p_out.shape[0] or p_in.shape[2] != p_out.shape[2]:
        raise ValueError(
            "probs_in (M, N, C) and probs_out (M, K, C) must agree in M and C; got "
            f"{tuple(p_in.shape)} and {tuple(p_out.shape)}"
        )
    fn = _OOD_SCORES[score]
    return ood_detection(fn(p_in), fn(p_out))


def classification_metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """All classification metrics of an ensemble as Python floats.

    Keys: ``accuracy``, ``nll``, ``brier``, ``ece`` (15 bins), ``ace`` (15 bins), and the
    example means of ``predictive_entropy``, ``expected_entropy``, ``mutual_information``
    and ``disagreement``.

    Args:
        probs: ``(M, N, C)``. labels: ``(N,)``.
    """
    p = _check_probs(probs)
    _check_labels(labels, p.shape[1], p.shape[2])
    _check_nonempty(p.shape[1])
    return {
        "accuracy": float(accuracy(p, labels)),
        "nll": float(nll(p, labels)),
        "brier": float(brier(p, labels)),
        "ece": float(ece(p, labels)),
        "ace": float(adaptive_ece(p, labels)),
        "predictive_entropy": float(predictive_entropy(p).mean()),
        "expected_entropy": float(expected_entropy(p).mean()),
        "mutual_information": float(mutual_information(p).mean()),
        "disagreement": float(disagreement(p).mean()),
    }


# -------------------------------------------------------------------------- regression


def _check_regression(
    means: Tensor, stds: Tensor | None, targets: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Validate and flatten to ``(M, N·D)`` / ``(N·D,)`` float64."""
    means, stds, targets = _tensor(means), _tensor(stds), _tensor(targets)
    if not isinstance(means, Tensor) or means.dim() not in (2, 3):
        shape = tuple(means.shape) if isinstance(means, Tensor) else type(means).__name__
        raise ValueError(f"means must have shape (M, N) or (M, N, D), got {shape}")
    if means.shape[0] < 1:
        raise ValueError("means needs at least one member (M >= 1)")
    _check_nonempty(means[0].numel())
    mu = means.to(torch.float64)
    sd = None
    if stds is not None:
        if not isinstance(stds, Tensor) or stds.shape != means.shape:
            shape = tuple(stds.shape) if isinstance(stds, Tensor) else type(stds).__name__
            raise ValueError(f"stds must have the shape of means {tuple(means.shape)}, got {shape}")
        sd = stds.to(torch.float64)
        if not bool((sd > 0).all()):
            raise ValueError("stds must be strictly positive (and not NaN)")
        sd = sd.reshape(sd.shape[0], -1)
    y = None
    if targets is not None:
        if not isinstance(targets, Tensor) or targets.shape != means.shape[1:]:
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(
                f"targets must have shape {tuple(means.shape[1:])} (means without the member "
                f"axis), got {shape}"
            )
        y = targets.to(torch.float64).reshape(-1)
    return mu.reshape(mu.shape[0], -1), sd, y


def rmse(means: Tensor, targets: Tensor) -> Tensor:
    """Root mean squared error of the mixture mean ``μ̄_n = (1/M) Σ_m μ_mn``.

    ``RMSE = sqrt((1/N) Σ_n (μ̄_n - y_n)²)``.

    Multi-output: ``means (M, N, D)`` with ``targets (N, D)`` are flattened to ``N·D``
    scalar predictions, so every regression metric here averages over examples *and*
    output dimensions (the NLL is the average per-dimension marginal NLL, not the joint).

    Args:
        means: ``(M, N)`` or ``(M, N, D)``. targets: ``(N,)`` or ``(N, D)``.

    Returns:
        0-dim float64.
    """
    mu, _, y = _check_regression(means, None, targets)
    return (mu.mean(0) - y).pow(2).mean().sqrt()


def _gaussian_logpdf(y: Tensor, mu: Tensor, sd: Tensor) -> Tensor:
    z = (y - mu) / sd
    return -0.5 * z * z - sd.log() - 0.5 * math.log(2 * math.pi)


def gaussian_mixture_nll(means: Tensor, stds: Tensor, targets: Tensor) -> Tensor:
    """NLL of the equal-weight Gaussian mixture of the members.

    ``NLL = -(1/N) Σ_n log (1/M) Σ_m N(y_n; μ_mn, σ_mn²)``, computed with ``logsumexp``.
    ``(M, N, D)`` inputs: per-dimension marginals, averaged (see :func:`rmse`).

    Args:
        means, stds: ``(M, N)`` or ``(M, N, D)``. targets: ``(N,)`` or ``(N, D)``.

    Returns:
        0-dim float64.
    """
    mu, sd, y = _check_regression(means, stds, targets)
    logp = _gaussian_logpdf(y, mu, sd)  # (M, N)
    return -(torch.logsumexp(logp, dim=0) - math.log(mu.shape[0])).mean()


def regression_calibration_error(means: Tensor, stds: Tensor, targets: Tensor) -> Tensor:
    """Quantile calibration error of the mixture (Kuleshov et al., 2018).

    With the probability integral transform of each target under the mixture CDF,
    ``u_n = (1/M) Σ_m Φ((y_n - μ_mn) / σ_mn)``, and the 19 levels
    ``q ∈ {0.05, 0.10, ..., 0.95}``:

    ``CE = (1/19) Σ_q |q - (1/N) Σ_n 1[u_n <= q]|``.

    0 for a calibrated model in the large-``N`` limit. Departure from the paper: Kuleshov
    et al. use squared deviations weighted by the number of points per level; we use the
    unweighted mean absolute deviation (on the same scale as ECE).
    ``(M, N, D)`` inputs: PITs of all ``N·D`` scalar targets pooled (see :func:`rmse`).

    Args:
        means, stds: ``(M, N)`` or ``(M, N, D)``. targets: ``(N,)`` or ``(N, D)``.

    Returns:
        0-dim float64.
    """
    mu, sd, y = _check_regression(means, stds, targets)
    pit = torch.special.ndtr((y - mu) / sd).mean(0)  # (N,)
    levels = torch.arange(1, 20, dtype=torch.float64, device=pit.device) / 20
    empirical = (pit[None, :] <= levels[:, None]).to(torch.float64).mean(1)
    return (levels - empirical).abs().mean()


def predictive_std(means: Tensor, stds: Tensor) -> Tensor:
    """Standard deviation of the equal-weight mixture (law of total variance).

    ``σ̄_n = sqrt((1/M) Σ_m σ_mn² + (1/M) Σ_m (μ_mn - μ̄_n)²)`` (population variance of the
    member means, no Bessel correction).

    Args:
        means, stds: ``(M, N)`` or ``(M, N, D)``.

    Returns:
        ``(N,)`` or ``(N, D)`` float64.
    """
    mu, sd, _ = _check_regression(means, stds, None)
    var = sd.pow(2).mean(0) + mu.var(0, correction=0)
    return var.sqrt().reshape(means.shape[1:])


def regression_metrics(means: Tensor, stds: Tensor, targets: Tensor) -> dict[str, float]:
    """All regression metrics as Python floats.

    Keys: ``rmse``, ``nll`` (:func:`gaussian_mixture_nll`), ``calibration_error``
    (:func:`regression_calibration_error`), ``mean_std`` (mean of :func:`predictive_std`).

    Args:
        means, stds: ``(M, N)`` or ``(M, N, D)``. targets: ``(N,)`` or ``(N, D)``.
    """
    return {
        "rmse": float(rmse(means, targets)),
        "nll": float(gaussian_mixture_nll(means, stds, targets)),
        "calibration_error": float(regression_calibration_error(means, stds, targets)),
        "mean_std": float(predictive_std(means, stds).mean()),
    }
