"""Out-of-distribution detection: AUROC, AUPR and FPR@95 of any score, and of the
uncertainty scores of two prediction sets.

Conventions (shapes, dtypes, devices): :mod:`diverse.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diverse.metrics._checks import _check_probs, _tensor
from diverse.metrics.uncertainty import mutual_information, predictive_entropy

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


