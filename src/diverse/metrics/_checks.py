"""Input validation shared by the metrics (one-line errors naming the value).

Conventions (shapes, dtypes, devices): :mod:`diverse.metrics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

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


def mean_probs(probs: Tensor) -> Tensor:
    """Ensemble predictive distribution ``p̄ = (1/M) Σ_m p_m``.

    Args:
        probs: member probabilities ``(M, N, C)``.

    Returns:
        ``(N, C)`` float64.
    """
    return _check_probs(probs).mean(0)


def mean_and_labels(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The ensemble's mean prediction ``(N, C)`` and the checked labels ``(N,)``: the
    prologue of every metric of the mean prediction (one-line errors for bad input)."""
    pbar = mean_probs(probs)
    y = _check_labels(labels, pbar.shape[0], pbar.shape[1])
    _check_nonempty(pbar.shape[0])
    return pbar, y

