"""Regression metrics for ensembles of Gaussian predictions: RMSE, mixture NLL,
calibration error, predictive std, and the regression summary.

Conventions (shapes, dtypes, devices): :mod:`diverse.metrics`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diverse.metrics._checks import _check_nonempty, _tensor

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
