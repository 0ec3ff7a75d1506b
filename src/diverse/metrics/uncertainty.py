"""Uncertainty of an ensemble's prediction: predictive and expected entropy, mutual
information, member disagreement.

Conventions (shapes, dtypes, devices): :mod:`diverse.metrics`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diverse.metrics._checks import _check_probs, mean_probs

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


