"""Calibration error: reliability diagram, ECE and adaptive ECE.

Conventions (shapes, dtypes, devices): :mod:`diverse.metrics`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diverse.metrics._checks import (
    _check_bins,
    mean_and_labels,
)

# ------------------------------------------------------------------------- calibration


def _confidence_correct(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence ``max_c p̄_nc`` and correctness ``1[argmax p̄_n = y_n]``, (N,)."""
    pbar, y = mean_and_labels(probs, labels)
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


