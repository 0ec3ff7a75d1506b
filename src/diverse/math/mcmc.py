"""Convergence diagnostics of Markov chains: split R-hat and effective sample size.

Pure functions of ``chains (C, T, ...)``: C chains of T draws of any number of
scalar quantities (trailing axes are independent quantities).

* :func:`split_rhat`: the potential scale reduction factor of Gelman et al.
  (BDA3, 2013, §11.4) on split chains — each chain halved, so 2C chains of
  ⌊T/2⌋ — ``R̂ = sqrt(((n−1)/n · W + B/n) / W)`` with W the mean within-chain
  variance and B/n the variance of the chain means. Near 1 when the chains
  agree; a common threshold is 1.01.
* :func:`effective_sample_size`: ``ESS = C·T / (1 + 2 Σ_t ρ̂_t)`` with the
  combined-chain autocorrelations ``ρ̂_t = 1 − (W − mean_c γ̂_{c,t}) / var⁺``
  (BDA3 eq. 11.7; var⁺ the pooled variance estimate) truncated by Geyer's
  initial monotone sequence (sums of consecutive pairs kept while positive
  and made non-increasing).

An HMC baseline reports both on the predictive function values f(x) at test
inputs — weights are not identified (permutation symmetry), functions are.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["effective_sample_size", "split_rhat"]


def _check(chains: Tensor, least: int) -> Tensor:
    if not isinstance(chains, Tensor) or chains.dim() < 2:
        raise ValueError("chains must be a tensor (C, T, ...): C chains of T draws")
    if chains.shape[1] < least:
        raise ValueError(f"chains need at least {least} draws each, got {chains.shape[1]}")
    return chains.detach().to(torch.float64)


def split_rhat(chains: Tensor) -> Tensor:
    """Split-R̂ of every quantity: ``(C, T, ...)`` → ``(...)`` float64 (needs T ≥ 4)."""
    x = _check(chains, 4)
    half = x.shape[1] // 2
    x = torch.cat([x[:, :half], x[:, -half:]], 0)  # 2C chains of ⌊T/2⌋ draws
    n = x.shape[1]
    within = x.var(1, correction=1).mean(0)
    between_over_n = x.mean(1).var(0, correction=1)
    pooled = (n - 1) / n * within + between_over_n
    return torch.sqrt(pooled / within.clamp_min(1e-300))


def _autocovariance(x: Tensor) -> Tensor:
    """Per-chain autocovariance ``(C, T, ...)`` at lags 0..T−1 (biased, by FFT)."""
    t = x.shape[1]
    centred = x - x.mean(1, keepdim=True)
    size = 2 ** (2 * t - 1).bit_length()
    f = torch.fft.rfft(centred, n=size, dim=1)
    return torch.fft.irfft(f * f.conj(), n=size, dim=1)[:, :t] / t


def effective_sample_size(chains: Tensor) -> Tensor:
    """ESS of every quantity: ``(C, T, ...)`` → ``(...)`` float64 (needs T ≥ 4).

    At most ``C·T·log10(C·T)`` (anti-correlated chains can exceed C·T).
    """
    x = _check(chains, 4)
    c, t = x.shape[:2]
    gamma = _autocovariance(x)  # (C, T, ...)
    within = x.var(1, correction=1).mean(0)
    var_plus = (t - 1) / t * within
    if c > 1:
        var_plus = var_plus + x.mean(1).var(0, correction=1)
    rho = 1.0 - (within - gamma.mean(0)) / var_plus.clamp_min(1e-300)  # (T, ...)
    rho[0] = 1.0
    pairs = t // 2
    pair_sums = rho[: 2 * pairs].reshape(pairs, 2, *rho.shape[1:]).sum(1)  # Γ_k = ρ_2k + ρ_2k+1
    # Geyer: keep the initial positive sequence, made monotone non-increasing
    positive = torch.cumprod((pair_sums > 0).to(torch.float64), 0)
    monotone = torch.cummin(torch.where(positive > 0, pair_sums, torch.zeros_like(pair_sums)),
                            0).values
    tau = -1.0 + 2.0 * (monotone * positive).sum(0)
    ess = c * t / tau.clamp_min(1e-12)
    return ess.clamp_max(c * t * torch.log10(torch.tensor(float(c * t))))
