"""Post-hoc calibration of ensembles: temperature scaling and predictive-std scaling.

Pure functions on tensors; each fit minimizes the NLL of held-out (validation)
data over one positive scalar, by L-BFGS on its logarithm (float64,
strong-Wolfe line search).

Classification (Guo et al. 2017, "On calibration of modern neural networks"),
in the two orders studied for ensembles (Rahaman & Thiery 2021, "Uncertainty
quantification and deep ensembles"):

* **pool-then-calibrate** (``"pooled"``): one temperature on the log of the
  ensemble mean, ``p_T = softmax(log p̄ / T)``, ``p̄ = (1/S) Σ_s p_s``; works for
  any predictive samples (members, Monte Carlo draws, weight samples) and
  returns one distribution ``(1, N, C)``.
* **calibrate-then-pool** (``"members"``): one temperature shared by every
  sample's logits, ``p̄_T = (1/S) Σ_s softmax(z_s / T)``, ``(S, N, C)`` — the
  member structure (mutual information, disagreement) is kept.

Regression: the predictive distribution (the equal-weight mixture of the
members' Gaussians) is scaled about its mean by ``s``: ``μ_s ← μ̄ + s (μ_s − μ̄)``,
``σ_s ← s σ_s``, so the mixture's shape is kept and its std (law of total
variance) becomes exactly ``s σ̄`` — the ensemble analogue of ``σ ← s σ``
(Kuleshov et al. 2018; Levi et al. 2022, "Evaluating and calibrating
uncertainty prediction in regression tasks").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diverse import metrics

__all__ = ["MODES", "apply_std_scale", "apply_temperature", "fit_std_scale", "fit_temperature",
           "pooled_log_probs", "temperature_nll"]

#: Temperature-scaling orders: pool-then-calibrate and calibrate-then-pool.
MODES = ("pooled", "members")
_LOG_BOUND = 10.0  # |log T| and |log s| stay within e^±10


def pooled_log_probs(probs: Tensor, eps: float = 1e-300) -> Tensor:
    """``log p̄`` ``(N, C)`` float64 of samples ``(S, N, C)`` (a zero mean is floored at eps)."""
    return metrics.mean_probs(probs).clamp_min(eps).log()


def _scaled(inputs: Tensor, mode: str, temperature: Tensor | float) -> Tensor:
    """Calibrated log p̄_T ``(N, C)``: ``inputs`` is log p̄ (pooled) or logits (members)."""
    if mode == "pooled":
        return torch.log_softmax(inputs / temperature, -1)
    logp = torch.log_softmax(inputs / temperature, -1)
    return torch.logsumexp(logp, 0) - math.log(inputs.shape[0])


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"temperature mode {mode!r}; allowed: {', '.join(MODES)}")


def _inputs(mode: str, probs: Tensor | None, logits: Tensor | None) -> Tensor:
    _check_mode(mode)
    if mode == "pooled":
        if probs is None:
            if logits is None:
                raise ValueError("pooled temperature scaling needs probs or logits")
            probs = logits.to(torch.float64).softmax(-1)
        return pooled_log_probs(probs)
    if logits is None:
        raise ValueError("calibrate-then-pool (mode 'members') needs the members' logits")
    if logits.dim() != 3:
        raise ValueError(f"logits must be (S, N, C), got {tuple(logits.shape)}")
    return logits.to(torch.float64)


def temperature_nll(temperature: float, labels: Tensor, mode: str = "pooled",
                    probs: Tensor | None = None, logits: Tensor | None = None) -> float:
    """Mean NLL of the labels after temperature ``T`` (the objective of :func:`fit_temperature`)."""
    logp = _scaled(_inputs(mode, probs, logits), mode, temperature)
    return float(-logp.gather(1, labels.to(torch.int64)[:, None]).mean())


def _minimize_log(objective: Callable[[Tensor], Tensor]) -> float:
    """``exp(argmin_θ objective(θ))`` over a scalar θ = log(scale) by L-BFGS, from θ = 0."""
    theta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=200, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = objective(theta.clamp(-_LOG_BOUND, _LOG_BOUND))
        value.backward()
        return value

    for _ in range(5):  # restarts end at once when the first run converged
        optimizer.step(closure)
    return float(theta.detach().clamp(-_LOG_BOUND, _LOG_BOUND).exp())


def fit_temperature(labels: Tensor, mode: str = "pooled", probs: Tensor | None = None,
                    logits: Tensor | None = None) -> float:
    """The temperature ``T > 0`` minimizing the validation NLL.

    Args:
        labels: ``(N,)`` validation labels.
        mode: ``"pooled"`` (needs ``probs (S, N, C)`` or ``logits``) or ``"members"``
            (needs ``logits (S, N, C)``).
    """
    inputs = _inputs(mode, probs, logits)
    y = metrics._check_labels(labels, inputs.shape[-2], inputs.shape[-1])

    def nll(theta: Tensor) -> Tensor:
        return -_scaled(inputs, mode, theta.exp()).gather(1, y[:, None]).mean()

    return _minimize_log(nll)


def apply_temperature(temperature: float, mode: str = "pooled", probs: Tensor | None = None,
                      logits: Tensor | None = None) -> Tensor:
    """Calibrated predictive samples: ``(1, N, C)`` (pooled) or ``(S, N, C)`` (members)."""
    inputs = _inputs(mode, probs, logits)
    if mode == "pooled":
        return torch.softmax(inputs / temperature, -1)[None]
    return torch.softmax(inputs / temperature, -1)


def apply_std_scale(scale: float | Tensor, means: Tensor, stds: Tensor) -> tuple[Tensor, Tensor]:
    """The mixture scaled about its mean by ``s``: ``(μ̄ + s (μ − μ̄), s σ)``, shapes kept."""
    mu_bar = means.mean(0, keepdim=True)
    return mu_bar + scale * (means - mu_bar), scale * stds


def fit_std_scale(means: Tensor, stds: Tensor, targets: Tensor) -> float:
    """The scale ``s > 0`` of the predictive std minimizing the validation mixture NLL.

    ``means``, ``stds`` ``(M, N)`` or ``(M, N, D)``; ``targets`` ``(N,)`` or ``(N, D)``
    (:func:`diverse.metrics.gaussian_mixture_nll`).
    """
    mu, sd = means.detach().to(torch.float64), stds.detach().to(torch.float64)
    y = targets.detach().to(torch.float64)
    metrics.gaussian_mixture_nll(mu, sd, y)  # validates shapes and stds

    def nll(theta: Tensor) -> Tensor:
        m, s = apply_std_scale(theta.exp(), mu, sd)
        return metrics.gaussian_mixture_nll(m, s, y)

    return _minimize_log(nll)
