"""Maximum mean discrepancy between two samples: pure functions on tensors.

The posterior-quality protocol of Laurent, Aldea & Franchi, "A symmetry-aware
exploration of Bayesian neural network posteriors" (ICLR 2024): a method's
weight samples ``x`` ``(n, D)`` are compared with reference posterior samples ``y``
``(m, D)`` (e.g. after :func:`diverse.nets.symmetry.remove_symmetries`) by the unbiased
MMD² estimate (Gretton et al., "A kernel two-sample test", JMLR 2012, Lemma 6)

    MMD²_u = 1/(n(n−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j)
             − 2/(nm) Σ_{i,j} k(x_i, y_j)

with Gaussian and Laplace kernels at 10 bandwidths each. Kernels follow the
reference code (the MMDAgg collection of Schrab et al. 2023, which the paper's code
translates):

* ``"gaussian"``: ``k(x, y) = exp(−‖x − y‖₂² / h²)``, bandwidths from L2 distances;
* ``"laplace"``: ``k(x, y) = exp(−‖x − y‖₁ / h)``, bandwidths from L1 distances.

(The form ``exp(−‖x − y‖²/(2h²))`` is the same family with ``h`` scaled by √2; the
geometric grid makes the difference a shift of the grid.)

Bandwidths (:func:`bandwidth_grid`): ``count`` values geometric from half the
smallest to twice the largest non-zero pairwise distance of the pooled sample.
Pooling (rather than the reference's cross distances on the first 500 points and its
0.1/0.3 floors) makes the grid invariant to relabelling, so the permutation null of
:func:`mmd_null_spread` uses exactly the kernels of the observed statistic.

Aggregate (:func:`mmd`): the **mean** of MMD² over all kernels × bandwidths. MMD² is
linear in the kernel, so this mean is the MMD² U-statistic of the averaged kernel
``k̄ = mean_r k_r``, itself characteristic: the aggregate stays an unbiased estimate
of a proper squared distance that is 0 exactly when the distributions agree (the
maximum over the grid, offered as ``aggregate="max"``, is biased upwards under the
null).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diverse.errors import UserError
from diverse.math.kernels import sq_dists

__all__ = [
    "AGGREGATES",
    "KERNELS",
    "bandwidth_grid",
    "mmd",
    "mmd2_unbiased",
    "mmd_null_spread",
    "pooled_distances",
]

#: kernel name -> the norm ``p`` of the distance it uses (and its bandwidths come from).
KERNELS: dict[str, int] = {"gaussian": 2, "laplace": 1}

#: how :func:`mmd` combines the grid of MMD² values.
AGGREGATES: tuple[str, ...] = ("mean", "max")


def _check_samples(x: Tensor, y: Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise UserError(
            f"MMD needs samples (n, D) and (m, D) of one dimension D, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise UserError(
            f"MMD U-statistic needs at least 2 points per sample, got n={x.shape[0]}, "
            f"m={y.shape[0]}"
        )


def _check_kernel(kernel: str) -> int:
    if kernel not in KERNELS:
        raise UserError(f"MMD kernel {kernel!r} is unknown; allowed: {', '.join(KERNELS)}")
    return KERNELS[kernel]


def pooled_distances(x: Tensor, y: Tensor, p: int = 2) -> Tensor:
    """``(n+m, n+m)``: ``‖z_i − z_j‖_p`` over the pooled sample ``z = [x; y]``.

    ``p = 2`` uses the centred Gram form of :func:`diverse.math.kernels.sq_dists` (accurate
    for points far from the origin, such as network weights); ``p = 1`` uses
    ``torch.cdist``. The diagonal is exactly 0.
    """
    _check_samples(x, y)
    z = torch.cat([x, y])
    if p == 2:
        return sq_dists(z).sqrt()
    if p == 1:
        d = torch.cdist(z, z, p=1)
        return d.fill_diagonal_(0.0)
    raise UserError(f"MMD distance norm p={p!r} is not supported; allowed: 1, 2")


def _kernel(d: Tensor, kernel: str, h: float | Tensor) -> Tensor:
    """Kernel matrix from distances of the kernel's own norm."""
    if kernel == "gaussian":
        return torch.exp(-((d / h) ** 2))
    return torch.exp(-d / h)


def _check_bandwidth(bandwidth: float | Tensor) -> None:
    value = float(bandwidth)
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"MMD bandwidth must be a positive finite number, got {bandwidth!r}")


def mmd2_unbiased(
    x: Tensor, y: Tensor, kernel: str = "gaussian", bandwidth: float | Tensor = 1.0
) -> Tensor:
    """Unbiased MMD² U-statistic (Gretton et al. 2012, Lemma 6) at one kernel.

    Args:
        x: ``(n, D)``, ``n >= 2``.
        y: ``(m, D)``, ``m >= 2``.
        kernel: ``"gaussian"`` (``exp(−‖x−y‖₂²/h²)``) or ``"laplace"``
            (``exp(−‖x−y‖₁/h)``).
        bandwidth: ``h > 0``.

    Returns:
        A 0-dim tensor; can be negative (its expectation is the population MMD²).
    """
    p = _check_kernel(kernel)
    _check_bandwidth(bandwidth)
    n, m = x.shape[0], y.shape[0]
    k = _kernel(pooled_distances(x, y, p), kernel, bandwidth)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return xx + yy - 2.0 * kxy.mean()


def _grid_from(d: Tensor, count: int) -> Tensor:
    if not isinstance(count, int) or count < 2:
        raise UserError(f"bandwidth count must be an integer >= 2, got {count!r}")
    positive = d[d > 0]
    if positive.numel() == 0:
        raise UserError("MMD bandwidth grid: all pooled samples coincide (no non-zero distance)")
    lo, hi = positive.min() / 2, positive.max() * 2
    return torch.exp(torch.linspace(0.0, 1.0, count, dtype=d.dtype, device=d.device)
                     * (hi.log() - lo.log()) + lo.log())


def bandwidth_grid(x: Tensor, y: Tensor, count: int = 10, p: int = 2) -> Tensor:
    """``(count,)`` bandwidths, geometric from ``min/2`` to ``2·max`` pairwise distance.

    Distances are the ``p``-norm (2 for the Gaussian, 1 for the Laplace kernel)
    between all distinct points of the pooled sample ``[x; y]``; zero distances
    (duplicates, the diagonal) are skipped.
    """
    return _grid_from(pooled_distances(x, y, p), count)


def _grid_statistics(
    d: Tensor, n: int, kernel: str, bandwidths: Tensor, member_of_x: Tensor
) -> Tensor:
    """``(P, count)`` MMD² for labelings ``member_of_x`` ``(P, N)`` (1 = in x, 0 = in y).

    With ``K₀`` the kernel matrix with zero diagonal and ``a`` a labeling:
    ``Σ_xx = aᵀK₀a``, ``Σ_xy = aᵀK₀(1−a)``, ``Σ_yy = 1ᵀK₀1 − 2·aᵀK₀1 + aᵀK₀a``.
    """
    m = d.shape[0] - n
    a = member_of_x.to(d.dtype)
    out = []
    for h in bandwidths:
        k0 = _kernel(d, kernel, h).fill_diagonal_(0.0)
        ak = a @ k0
        xx = (ak * a).sum(1)
        row = ak.sum(1)
        xy = row - xx
        yy = k0.sum() - 2.0 * row + xx
        out.append(xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m))
    return torch.stack(out, dim=1)


def _aggregate(values: Tensor, aggregate: str) -> Tensor:
    if aggregate == "mean":
        return values.mean(-1)
    return values.amax(-1)


def _check_grid_args(kernels: Sequence[str], aggregate: str) -> tuple[str, ...]:
    kernels = tuple(kernels)
    if not kernels:
        raise UserError(f"MMD needs at least one kernel; allowed: {', '.join(KERNELS)}")
    for kernel in kernels:
        _check_kernel(kernel)
    if aggregate not in AGGREGATES:
        raise UserError(
            f"MMD aggregate {aggregate!r} is unknown; allowed: {', '.join(AGGREGATES)}"
        )
    return kernels


def _all_statistics(
    x: Tensor, y: Tensor, kernels: tuple[str, ...], count: int, member_of_x: Tensor
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    distances = {p: pooled_distances(x, y, p) for p in {KERNELS[k] for k in kernels}}
    grids = {k: _grid_from(distances[KERNELS[k]], count) for k in kernels}
    values = {
        k: _grid_statistics(distances[KERNELS[k]], x.shape[0], k, grids[k], member_of_x)
        for k in kernels
    }
    return values, grids


def mmd(
    x: Tensor,
    y: Tensor,
    kernels: Sequence[str] = ("gaussian", "laplace"),
    count: int = 10,
    aggregate: str = "mean",
) -> dict[str, Tensor]:
    """MMD² over a grid of kernels and bandwidths, and their aggregate.

    Args:
        x: ``(n, D)`` samples (e.g. a method's flattened weights), ``n >= 2``.
        y: ``(m, D)`` reference samples, ``m >= 2``.
        kernels: names from :data:`KERNELS`; default both.
        count: bandwidths per kernel (:func:`bandwidth_grid`); default 10.
        aggregate: ``"mean"`` (default, see the module docstring) or ``"max"``.

    Returns:
        ``{kernel: (count,) MMD², f"{kernel}_bandwidth": (count,) bandwidths,
        "aggregate": 0-dim}``; the aggregate is taken over all kernels × bandwidths.
    """
    kernels = _check_grid_args(kernels, aggregate)
    _check_samples(x, y)
    n, m = x.shape[0], y.shape[0]
    observed = torch.cat([torch.ones(n), torch.zeros(m)]).to(x.device).unsqueeze(0)
    values, grids = _all_statistics(x, y, kernels, count, observed)
    out: dict[str, Tensor] = {}
    for k in kernels:
        out[k] = values[k][0]
        out[f"{k}_bandwidth"] = grids[k]
    out["aggregate"] = _aggregate(torch.cat([values[k][0] for k in kernels]), aggregate)
    return out


def mmd_null_spread(
    x: Tensor,
    y: Tensor,
    permutations: int,
    generator: torch.Generator,
    kernels: Sequence[str] = ("gaussian", "laplace"),
    count: int = 10,
    aggregate: str = "mean",
) -> Tensor:
    """``(permutations,)``: the aggregate of :func:`mmd` after random relabelings.

    Pools ``[x; y]`` and redraws which ``n`` points form the first sample, uniformly
    (permutation test; Gretton et al. 2012, §5). Under ``x ~ y`` the observed
    aggregate is one more draw of this distribution, so "MMD ≈ 0" means "within its
    null spread", e.g. below the 95% quantile. Same kernels and bandwidths as
    :func:`mmd` (the pooled grid does not depend on the labeling).

    Args:
        x, y, kernels, count, aggregate: as in :func:`mmd`.
        permutations: number of relabelings, ``>= 1``.
        generator: a ``torch.Generator`` (CPU) drawing the relabelings.
    """
    kernels = _check_grid_args(kernels, aggregate)
    _check_samples(x, y)
    if not isinstance(permutations, int) or permutations < 1:
        raise UserError(f"permutations must be an integer >= 1, got {permutations!r}")
    n, total = x.shape[0], x.shape[0] + y.shape[0]
    order = torch.argsort(torch.rand(permutations, total, generator=generator), dim=1)
    labels = torch.zeros(permutations, total).scatter_(1, order[:, :n], 1.0).to(x.device)
    values, _ = _all_statistics(x, y, kernels, count, labels)
    return _aggregate(torch.cat([values[k] for k in kernels], dim=1), aggregate)
