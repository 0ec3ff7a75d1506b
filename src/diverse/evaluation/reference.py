"""How far a method's predictive is from a reference posterior's (e.g. HMC): pure functions.

For regression on 1D inputs, both sides are samples of the function value
``f(x)`` at the same test inputs — a method's members (or draws) ``(S₁, N)`` and
the reference's draws ``(S₂, N)`` — and the comparison is made per input:

* :func:`wasserstein2_1d`: the exact 2-Wasserstein distance between the two
  empirical distributions of f(x) at every x (``(N,)``);
* :func:`input_regions`: which test inputs are *near* the training data, in the
  *gap* between training inputs, or in *extrapolation* beyond their range;
* :func:`distance_table`: mean W2, the ratio of the methods' std of f to the
  reference's, and the mean absolute difference of the means, per region; plus
  the NLL of noisy held-out targets under each predictive (the members'
  Gaussian mixture) when those are given.

Std convention: population std over samples (no Bessel correction), as
:func:`diverse.metrics.predictive_std`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["REGIONS", "distance_table", "input_regions", "mixture_nll", "wasserstein2_1d"]

REGIONS = ("near", "gap", "extrapolation")


def wasserstein2_1d(a: Tensor, b: Tensor) -> Tensor:
    """Exact W2 between the empirical distributions of ``a (N, S₁)`` and ``b (N, S₂)`` per row.

    ``W2² = ∫₀¹ (F_a⁻¹(u) − F_b⁻¹(u))² du`` with the step quantile functions of the
    sorted samples, integrated over the union of their break points
    ``{i/S₁} ∪ {j/S₂}``. Returns ``(N,)`` float64.
    """
    a = torch.sort(a.detach().to(torch.float64), dim=-1).values
    b = torch.sort(b.detach().to(torch.float64), dim=-1).values
    s1, s2 = a.shape[-1], b.shape[-1]
    cuts = torch.unique(torch.cat([torch.arange(1, s1 + 1, dtype=torch.float64) / s1,
                                   torch.arange(1, s2 + 1, dtype=torch.float64) / s2]))
    widths = torch.diff(torch.cat([cuts.new_zeros(1), cuts]))
    mid = cuts - widths / 2  # a point inside each piece
    ia = torch.clamp((mid * s1).floor().long(), max=s1 - 1)
    ib = torch.clamp((mid * s2).floor().long(), max=s2 - 1)
    return ((a[..., ia] - b[..., ib]).square() * widths).sum(-1).sqrt()


def input_regions(x_test: Tensor, x_train: Tensor, far: float = 0.5) -> dict[str, Tensor]:
    """Masks ``(N,)`` of 1D test inputs: ``near`` (a training input within ``far``),
    ``gap`` (farther, but inside the training range), ``extrapolation`` (farther and
    outside it)."""
    xt, xr = x_test.reshape(-1).to(torch.float64), x_train.reshape(-1).to(torch.float64)
    distance = (xt[:, None] - xr[None, :]).abs().min(1).values
    inside = (xt >= xr.min()) & (xt <= xr.max())
    near = distance <= far
    return {"near": near, "gap": ~near & inside, "extrapolation": ~near & ~inside}


def mixture_nll(means: Tensor, stds: Tensor, targets: Tensor) -> Tensor:
    """``−log (1/S) Σ_s N(y; μ_s, σ_s²)`` per target: means/stds ``(S, N)``, targets
    ``(R, N)`` (R draws per input) → ``(R, N)``."""
    mu, sd = means.to(torch.float64)[:, None], stds.to(torch.float64)[:, None]
    z = (targets.to(torch.float64)[None] - mu) / sd
    logp = -0.5 * z.square() - sd.log() - 0.5 * math.log(2 * math.pi)
    return -(torch.logsumexp(logp, 0) - math.log(means.shape[0]))


def distance_table(f: Tensor, f_ref: Tensor, regions: dict[str, Tensor],
                   noise: Tensor | None = None, noise_ref: Tensor | None = None,
                   targets: Tensor | None = None) -> dict[str, float]:
    """Figures of a method's samples of f ``(S, N)`` against the reference's ``(S_ref, N)``.

    Keys: ``w2`` (mean over all inputs of :func:`wasserstein2_1d`), and per region r
    of ``regions``: ``w2_r``, ``std_ratio_r`` (mean std of f over the region's inputs
    divided by the reference's), ``mean_diff_r`` (mean |μ − μ_ref|). With the
    per-sample noise stds ``noise``/``noise_ref`` (same shapes) and noisy held-out
    ``targets (R, N)``: ``heldout_nll`` and ``heldout_nll_ref`` (mixture NLL, mean
    over targets) and ``heldout_nll_r`` per region.
    """
    f, f_ref = f.to(torch.float64), f_ref.to(torch.float64)
    w2 = wasserstein2_1d(f.T, f_ref.T)
    std, std_ref = f.std(0, correction=0), f_ref.std(0, correction=0)
    diff = (f.mean(0) - f_ref.mean(0)).abs()
    out = {"w2": float(w2.mean())}
    nll = nll_ref = None
    if noise is not None and targets is not None:
        nll = mixture_nll(f, noise, targets).mean(0)
        out["heldout_nll"] = float(nll.mean())
        if noise_ref is not None:
            nll_ref = mixture_nll(f_ref, noise_ref, targets).mean(0)
            out["heldout_nll_ref"] = float(nll_ref.mean())
    for name, mask in regions.items():
        if not bool(mask.any()):
            continue
        out[f"w2_{name}"] = float(w2[mask].mean())
        out[f"std_ratio_{name}"] = float(std[mask].mean() / std_ref[mask].mean().clamp_min(1e-300))
        out[f"mean_diff_{name}"] = float(diff[mask].mean())
        if nll is not None:
            out[f"heldout_nll_{name}"] = float(nll[mask].mean())
    return out
