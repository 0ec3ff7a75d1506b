"""Per-example uncertainty scores of predictive samples: pure functions on tensors.

Every score maps predictive samples — probabilities ``probs (S, N, C)`` and,
where the likelihood has them, the logits ``logits (S, N, C)`` they came from —
to one number per example ``(N,)`` float64, **higher meaning more uncertain**
(more likely out-of-distribution, or the first to be rejected by a selective
classifier). ``S`` is the member/sample axis: ensemble members, Monte Carlo
draws or weight samples (:mod:`diverse.nets.samples`). The confidence of a
selective classifier is the negated score.

How each score pools the samples:

========================  ==================================================================
``msp``                   ``−max_c p̄_nc``, p̄ the mean of the sample probabilities
                          (maximum softmax probability; Hendrycks & Gimpel 2017).
``max_logit``             ``−max_c z̄_nc``, z̄ the mean of the sample logits (Hendrycks et al.
                          2022, "Scaling out-of-distribution detection for real-world
                          settings"). Needs logits.
``energy``                ``(1/S) Σ_s −logsumexp_c z_snc``: the mean of the samples' free
                          energies at T = 1 (Liu et al. 2020, "Energy-based out-of-distribution
                          detection"). Needs logits.
``entropy``               ``H[p̄_n]``, the predictive (total) entropy.
``mutual_information``    ``H[p̄_n] − (1/S) Σ_s H[p_sn]`` (BALD; Houlsby et al. 2011).
``variation_ratio``       ``1 − max_c (votes_nc / S)``, votes of the samples' argmax (Freeman
                          1965; Gal 2016, §3.3.1).
``pairwise_kl``           ``1/(S(S−1)) Σ_{s≠t} KL(p_sn ‖ p_tn)``, the mean over ordered pairs
                          (computed in O(S), see :func:`pairwise_kl`).
``disagreement``          the mean pairwise disagreement of the samples' argmax
                          (:func:`diverse.metrics.disagreement`).
========================  ==================================================================

The last four measure disagreement between samples and are 0 for ``S = 1``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diverse import metrics

__all__ = ["LOGIT_SCORES", "SCORES", "energy", "max_logit", "msp", "pairwise_kl",
           "uncertainty_scores", "variation_ratio"]


def _check_logits(logits: Tensor, probs: Tensor) -> Tensor:
    if not isinstance(logits, Tensor) or logits.shape != probs.shape:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must have the shape of probs {tuple(probs.shape)}, got {shape}")
    z = logits.to(torch.float64)
    if not bool(torch.isfinite(z).all()):
        raise ValueError("logits contain NaN or inf")
    return z


def msp(probs: Tensor) -> Tensor:
    """Negated maximum softmax probability of the sample mean, ``−max_c p̄_nc`` ``(N,)``."""
    return -metrics.mean_probs(probs).max(-1).values


def max_logit(logits: Tensor) -> Tensor:
    """Negated maximum of the mean logit over samples, ``−max_c (1/S) Σ_s z_snc`` ``(N,)``."""
    return -logits.to(torch.float64).mean(0).max(-1).values


def energy(logits: Tensor) -> Tensor:
    """Mean free energy of the samples, ``(1/S) Σ_s −logsumexp_c z_snc`` ``(N,)`` (T = 1)."""
    return -torch.logsumexp(logits.to(torch.float64), dim=-1).mean(0)


def variation_ratio(probs: Tensor) -> Tensor:
    """``1 − (count of the modal class among the samples' argmax) / S`` ``(N,)``; 0 for S = 1."""
    p = metrics._check_probs(probs)
    s, _, c = p.shape
    votes = torch.nn.functional.one_hot(p.argmax(-1), c).sum(0)  # (N, C)
    return 1.0 - votes.max(-1).values.to(torch.float64) / s


def pairwise_kl(probs: Tensor, logits: Tensor | None = None) -> Tensor:
    """Mean KL divergence over ordered pairs of samples ``(N,)``; 0 for ``S = 1``.

    ``1/(S(S−1)) Σ_{s≠t} KL(p_s ‖ p_t)`` with ``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)``.
    Summing over all pairs (the ``s = t`` terms vanish),
    ``Σ_{s,t} KL(p_s ‖ p_t) = S Σ_s Σ_c p_sc log p_sc − Σ_c (Σ_s p_sc)(Σ_t log p_tc)``,
    which is O(S) instead of O(S²). The log-probabilities are ``log_softmax(logits)``
    when logits are given (exact), else ``log max(p, 1e-30)`` (a zero probability of a
    sample where another sample puts mass gives a large but finite divergence).
    """
    p = metrics._check_probs(probs)
    s = p.shape[0]
    if s == 1:
        return torch.zeros(p.shape[1], dtype=torch.float64, device=p.device)
    logp = (torch.log_softmax(_check_logits(logits, probs), -1) if logits is not None
            else p.clamp_min(1e-30).log())
    self_term = s * torch.special.xlogy(p, p).sum((0, 2))
    cross = (p.sum(0) * logp.sum(0)).sum(-1)
    return ((self_term - cross) / (s * (s - 1))).clamp_min(0.0)


#: Scores computed from probabilities alone: name -> ``fn(probs, logits | None) -> (N,)``.
SCORES: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "msp": lambda p, z: msp(p),
    "max_logit": lambda p, z: max_logit(z),
    "energy": lambda p, z: energy(z),
    "entropy": lambda p, z: metrics.predictive_entropy(p),
    "mutual_information": lambda p, z: metrics.mutual_information(p),
    "variation_ratio": lambda p, z: variation_ratio(p),
    "pairwise_kl": pairwise_kl,
    "disagreement": lambda p, z: metrics.disagreement(p),
}
#: The scores that need logits.
LOGIT_SCORES = ("max_logit", "energy")


def uncertainty_scores(probs: Tensor, logits: Tensor | None = None,
                       names: tuple[str, ...] | None = None) -> dict[str, Tensor]:
    """Every score of :data:`SCORES` (or those in ``names``) as ``{name: (N,)}`` float64.

    ``probs`` ``(S, N, C)``; ``logits`` ``(S, N, C)`` or ``None``, in which case the
    scores of :data:`LOGIT_SCORES` are left out (naming one of them in ``names`` is an
    error).
    """
    chosen = tuple(SCORES) if names is None else names
    unknown = [n for n in chosen if n not in SCORES]
    if unknown:
        raise ValueError(f"unknown uncertainty score {unknown[0]!r}; allowed: {', '.join(SCORES)}")
    if logits is None:
        missing = [n for n in chosen if n in LOGIT_SCORES]
        if names is not None and missing:
            raise ValueError(f"score {missing[0]!r} needs logits; none were given")
        chosen = tuple(n for n in chosen if n not in LOGIT_SCORES)
    else:
        _check_logits(logits, probs)
    return {name: SCORES[name](probs, logits) for name in chosen}
