"""HE-CKA: hyperspherical energy of the members' CKA points (Smerkous, Bai & Fuxin, NeurIPS 2024).

Smerkous, Bai & Fuxin, "Enhancing diversity in Bayesian deep learning via
hyperspherical energy minimization of CKA" (NeurIPS 2024; code
Deep-Machine-Vision/he-cka-ensembles). For one layer, each member m becomes a point
on the unit sphere, k̂_m = vec(centered K_m)/‖·‖ (:func:`diverse.math.cka.unit_grams`), so
that ⟨k̂_m, k̂_n⟩ = CKA_mn. The term is the mean pairwise energy of these points,

    θ_mn = arccos(⟨k̂_m, k̂_n⟩ / (1 + ε_arc)),
    E_mn = (1 + ε) / (θ_mn^s + ε)          (Riesz, s > 0; default s = 2)
    E_mn = −log(θ_mn + ε)                  (s = 0: log energy)
    E_mn = exp(−(s θ_mn + ε))              (exponential variant, the paper's CIFAR runs)
    HE   = mean_{m ≠ n} E_mn,

and over layers Σ_l w_l HE_l with depth-increasing weights (:func:`layer_weights`),
ramped in by w_t (:func:`warmup`). Why not minimize CKA itself: CKA = cos θ and
d cos θ/dθ = −sin θ → 0 as two members become identical, so 1 − CKA gives no push
apart exactly when it is needed; the energy's dE/dθ grows as θ → 0 and dθ/d cos θ =
−1/sin θ blows up, so HE's gradient is largest for nearly identical members. ε_arc
keeps θ away from 0 (θ ≥ arccos(1/(1 + ε_arc)) ≈ sqrt(2 ε_arc)) and the gradient finite.

All functions are pure; the member axis is explicit (features ``(M, B, ...)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from diverse.errors import UserError
from diverse.math.cka import as_matrix, unit_grams

__all__ = [
    "ENERGIES",
    "FIRST_MIDDLE_LAST",
    "LAYER_SCHEDULES",
    "exponential_energy",
    "first_middle_last",
    "geodesic",
    "he_cka",
    "he_cka_layers",
    "layer_weights",
    "riesz_energy",
    "warmup",
]

FIRST_MIDDLE_LAST = {"first": 0.0, "middle_start": 0.5, "middle_increase": 1.75, "last": 6.5}
"""The reference's ``start_end_linear`` layer weighting as used in its Dirty-MNIST
configs (``configs/mnist/ens+ood/he-cossim.yml``)."""

LAYER_SCHEDULES = ("first-middle-last", "uniform")
"""Named schedules accepted by :func:`layer_weights`."""


# --------------------------------------------------------------------------- sphere geometry


def geodesic(unit: Tensor, eps_arc: float = 1e-3) -> Tensor:
    """Pairwise geodesic distances ``θ_mn = arccos(⟨k̂_m, k̂_n⟩ / (1 + ε_arc))``.

    Args:
        unit: unit vectors ``(M, D)`` (e.g. :func:`diverse.math.cka.unit_grams`).
        eps_arc: ``ε_arc ≥ 0``. Shrinking the cosine by ``1 + ε_arc`` keeps it inside
            ``(−1, 1)`` so that arccos and its gradient ``−1/sqrt(1 − c²)`` stay finite
            for identical members (``θ ≥ arccos(1/(1 + ε_arc)) ≈ sqrt(2 ε_arc)``).
            Default ``1e-3``: the reference ``HEModelKernel`` default and its CIFAR
            config (its Dirty-MNIST config uses ``0.065``). With ``ε_arc = 0`` the
            gradient is infinite for identical members.

    Returns:
        ``(M, M)``; the (unused) diagonal is exactly 0 with zero gradient. The shrunk
        cosine is also clamped to ``[−1, 1]`` against rounding.
    """
    if eps_arc < 0:
        raise UserError(f"eps_arc must be >= 0, got {eps_arc}")
    m = unit.shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=unit.device)
    cos = (unit @ unit.mT) / (1.0 + eps_arc)
    cos = torch.where(eye, torch.zeros_like(cos), cos).clamp(-1.0, 1.0)  # safe diagonal
    theta = torch.arccos(cos)
    return torch.where(eye, torch.zeros_like(theta), theta)


def riesz_energy(theta: Tensor, s: float = 2.0, eps: float = 1e-6) -> Tensor:
    """Riesz ``s``-energy of geodesic distances, elementwise.

    ``s > 0``: ``(1 + ε) / (θ^s + ε)`` (equals 1 at ``θ = 1``, bounded by ``(1 + ε)/ε``).
    ``s = 0``: the log energy ``−log(θ + ε)``. The reference computes
    ``log(1/(θ + ε) + ε)`` for ``s = 0`` and ``1/(θ + ε)`` for ``s = 1``; both differ
    from ours by ``O(ε)``. Default ``ε = 1e-6`` (reference ``HEModelKernel`` default).
    """
    if s < 0:
        raise UserError(f"Riesz exponent s must be >= 0, got {s}")
    if s == 0:
        return -torch.log(theta + eps)
    return (1.0 + eps) / (theta.pow(s) + eps)


def exponential_energy(theta: Tensor, s: float = 2.0, eps: float = 1e-6) -> Tensor:
    """Exponential energy ``exp(−(s θ + ε))``, elementwise (reference ``use_exp``)."""
    return torch.exp(-(s * theta + eps))


ENERGIES: dict[str, Callable[..., Tensor]] = {
    "riesz": riesz_energy,
    "exponential": exponential_energy,
}
"""Name → energy ``(theta, s, eps) -> E``."""


# --------------------------------------------------------------------------- the term


def he_cka(
    features: Tensor,
    *,
    kernel: str = "linear",
    centering: str = "standard",
    s: float = 2.0,
    energy: str = "riesz",
    eps: float = 1e-6,
    eps_arc: float = 1e-3,
    detach_diagonal: bool = True,
) -> Tensor:
    """HE-CKA of one layer: ``mean_{m ≠ n} E(θ_mn)`` (a scalar to MINIMIZE).

    Args:
        features: ``(M, B, ...)``; everything after the batch axis is flattened
            (:func:`diverse.math.cka.as_matrix`).
        kernel: Gram kernel, ``"linear"``, ``"cosine"`` or ``"rbf"``.
        centering: ``"standard"`` (``H K H``: the paper's CKA, default) or
            ``"one-sided"`` (``K H``: the reference code).
        s: energy exponent (Riesz: ``s ≥ 0``, ``s = 0`` log energy; exponential: rate).
        energy: ``"riesz"`` (default) or ``"exponential"``.
        eps: energy smoothing ε.
        eps_arc: arccos smoothing ε_arc (see :func:`geodesic`).
        detach_diagonal: detach the Grams' diagonals (see
            :func:`diverse.math.cka.unit_grams`); the reference default is ``True``.

    Returns:
        A 0-dim tensor; ``M = 1`` gives a constant 0 (no pairs, no graph).
    """
    if energy not in ENERGIES:
        raise UserError(f"unknown energy {energy!r}; allowed: {', '.join(ENERGIES)}")
    feats = as_matrix(features, leading=1)
    m = feats.shape[0]
    if m < 2:
        return feats.new_zeros(())
    unit = unit_grams(feats, kernel, centering, detach_diagonal)
    theta = geodesic(unit, eps_arc)
    off = ~torch.eye(m, dtype=torch.bool, device=theta.device)
    # the energy is evaluated on off-diagonal pairs only: θ_mm = 0 would give infinite
    # derivatives of θ^s for s < 1 (0 · inf = NaN in the backward pass)
    return ENERGIES[energy](theta[off], s=s, eps=eps).mean()


# --------------------------------------------------------------------------- layers and time


def first_middle_last(
    n_layers: int,
    first: float = FIRST_MIDDLE_LAST["first"],
    middle_start: float = FIRST_MIDDLE_LAST["middle_start"],
    middle_increase: float = FIRST_MIDDLE_LAST["middle_increase"],
    last: float = FIRST_MIDDLE_LAST["last"],
) -> list[float]:
    """Unnormalized depth-increasing weights (reference ``start_end_linear``).

    Layer 0 gets ``first``; the last layer (if ``n_layers ≥ 2``) gets ``last``; a
    middle layer ``l`` gets ``middle_start + middle_increase · (l − 1)``. Defaults are
    the reference's Dirty-MNIST numbers: for 5 layers ``[0, 0.5, 2.25, 4.0, 6.5]``.
    """
    if n_layers < 1:
        raise UserError(f"n_layers must be >= 1, got {n_layers}")
    raw = [first] + [middle_start + middle_increase * (l - 1) for l in range(1, n_layers - 1)]
    if n_layers >= 2:
        raw.append(last)
    return raw


def layer_weights(
    n_layers: int, schedule: str | Sequence[float] = "first-middle-last", normalize: bool = True
) -> list[float]:
    """Per-layer weights ``w_l`` of ``Σ_l w_l HE_l``.

    Args:
        n_layers: number of feature layers ``L ≥ 1``.
        schedule: ``"first-middle-last"`` (:func:`first_middle_last` with the reference
            defaults: 5 layers → ``[0, 0.5, 2.25, 4, 6.5] / 13.25``; 2 layers →
            ``[0, 1]``), ``"uniform"`` (``1/L`` each), or an explicit list of ``L``
            finite non-negative numbers.
        normalize: divide by the sum so that the weights sum to 1 (the reference's
            CIFAR config uses raw weights: ``normalize=False``).

    Returns:
        ``L`` floats. A single layer always gets weight 1 (the first-middle-last
        schedule would give it the first-layer weight 0).
    """
    if n_layers < 1:
        raise UserError(f"n_layers must be >= 1, got {n_layers}")
    if isinstance(schedule, str):
        if schedule not in LAYER_SCHEDULES:
            raise UserError(
                f"unknown layer schedule {schedule!r}; allowed: "
                f"{', '.join(LAYER_SCHEDULES)} or a list of {n_layers} weights"
            )
        if n_layers == 1:
            return [1.0]
        raw = first_middle_last(n_layers) if schedule == "first-middle-last" else [1.0] * n_layers
    else:
        raw = [float(w) for w in schedule]
        if len(raw) != n_layers:
            raise UserError(f"layer weights {raw} have length {len(raw)}, expected {n_layers}")
        if any(not math.isfinite(w) or w < 0 for w in raw):
            raise UserError(f"layer weights {raw} must be finite and >= 0")
    if not normalize:
        return raw
    total = sum(raw)
    if total <= 0:
        raise UserError(f"layer weights {raw} sum to {total}; need a positive sum to normalize")
    return [w / total for w in raw]


def warmup(step: int, warmup_steps: int) -> float:
    """Linear ramp ``w_t = min(1, step / warmup_steps)``; ``warmup_steps = 0`` gives 1.

    The reference uses ``(1e-8 + step) / warmup`` below ``warmup``; we start at exactly 0.
    """
    if step < 0 or warmup_steps < 0:
        raise UserError(f"step and warmup_steps must be >= 0, got {step} and {warmup_steps}")
    if warmup_steps == 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def he_cka_layers(features: Mapping[str, Tensor], weights: Sequence[float], **kw: Any) -> Tensor:
    """Weighted HE-CKA over layers: ``Σ_l w_l HE_l``.

    Args:
        features: ``{layer: (M, B, ...)}`` in layer order (e.g. from
            ``Ensemble.features``); convolutional maps are flattened per layer.
        weights: one weight per layer, in the mapping's order (see
            :func:`layer_weights`). Layers with weight 0 are skipped (not computed).
        kw: keyword options of :func:`he_cka`.

    Returns:
        A 0-dim tensor.
    """
    if len(weights) != len(features):
        raise UserError(
            f"got {len(weights)} layer weights for {len(features)} feature layers "
            f"({', '.join(features)})"
        )
    total: Tensor | None = None
    for w, feats in zip(weights, features.values(), strict=True):
        if w == 0:
            continue
        term = float(w) * he_cka(feats, **kw)
        total = term if total is None else total + term
    if total is None:
        first = next(iter(features.values()), None)
        return torch.zeros(()) if first is None else first.new_zeros(())
    return total
