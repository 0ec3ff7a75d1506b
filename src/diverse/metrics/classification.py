"""Accuracy, NLL and the Brier score of the ensemble's mean prediction, and the
classification summary.

Conventions (shapes, dtypes, devices): :mod:`diverse.metrics`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diverse.metrics._checks import (
    _check_labels,
    _check_nonempty,
    _check_probs,
    _tensor,
    mean_and_labels,
)
from diverse.metrics.calibration import adaptive_ece, ece
from diverse.metrics.uncertainty import (
    disagreement,
    expected_entropy,
    mutual_information,
    predictive_entropy,
)

# ------------------------------------------------------------------- basic predictions


def accuracy(probs: Tensor, labels: Tensor) -> Tensor:
    """Accuracy of the ensemble prediction ``argmax_c p̄_nc``.

    ``acc = (1/N) Σ_n 1[argmax_c p̄_nc = y_n]``.

    Args:
        probs: ``(M, N, C)``. labels: ``(N,)``.

    Returns:
        0-dim float64.
    """
    pbar, y = mean_and_labels(probs, labels)
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
    pbar, y = mean_and_labels(probs, labels)
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
    pbar, y = mean_and_labels(probs, labels)
    onehot = torch.nn.functional.one_hot(y, pbar.shape[1]).to(torch.float64)
    return (pbar - onehot).pow(2).sum(-1).mean()




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


