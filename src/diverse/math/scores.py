"""Score estimators: ``g_i ≈ ∇ log ρ(x_i)`` from the particles ``x`` alone.

Every estimator maps particles ``x (..., M, D)`` to ``g (..., M, D)`` (leading
dimensions are independent particle sets). WGD (D'Angelo & Fortuin 2021) moves
particle ``i`` along ``a_t ∇ log p(x_i) − g_i``; the estimators differ in how they
approximate the unknown density ``ρ`` of the particles:

* :func:`kde_score` — gradient of the log of a kernel density estimate.
* :func:`sge_score` — Stein gradient estimator (Li & Turner 2018).
* :func:`ssge_score` — spectral Stein gradient estimator (Shi, Sun & Zhu 2018).

Sign convention (checked against the exact score of Gaussians in the tests):
with ``sum_first_i = Σ_j ∇_{x_i} k(x_i, x_j)`` and
``sum_second_i = Σ_j ∇_{x_j} k(x_j, x_i)`` (see
:func:`diverse.math.kernels.kernel_grad_sums`; ``sum_second = −sum_first`` for a
symmetric kernel), Stein's identity ``E_ρ[k(x, x_i) ∇ log ρ(x) + ∇_x k(x, x_i)] = 0``
estimated on the particles reads ``Kᵀ G ≈ −sum_second``, hence
``G = −(Kᵀ + ηI)⁻¹ sum_second = (K + ηI)⁻¹ sum_first``. The second form is what the
RDE code computes (``solve(K + ηI, autograd.grad(K(W, W.detach()).sum(), W))``).

Bandwidth ``h``: a float, a tensor, or a heuristic on the squared distances
(default :func:`diverse.math.kernels.median_heuristic`); always detached.

Precision: the ``M × M`` linear algebra (solve, eigendecomposition) runs in float64
whatever the input dtype — ``K + ηI`` has condition number up to ``~M/η`` (``10⁴`` at
``M = 100``, ``η = 0.01``), too much for float32. For float64 inputs the result is
solved exactly; for lower precision the ``M × M`` operator is formed in float64,
rounded to the input dtype and applied with one matrix product, so the ``(M, D)``
tensors (``D`` may be millions of weights) are never copied to float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diverse.math.kernels import (
    Bandwidth,
    grad_sum_operators,
    kernel_and_weights,
    kernel_matrix,
    median_heuristic,
    resolve_bandwidth,
    sq_dists,
)

__all__ = ["SCORE_ESTIMATORS", "SCORE_OPERATORS", "kde_operator", "kde_score", "sge_operator",
           "sge_score", "ssge_operator", "ssge_score"]


def _eye_like(k: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.eye(k.shape[-1], dtype=dtype, device=k.device)


def _apply(op64: Tensor, b: Tensor) -> Tensor:
    """``op64 @ b`` with ``op64`` computed in float64; see the module note on precision."""
    if b.dtype == torch.float64:
        return op64 @ b
    return op64.to(b.dtype) @ b


def kde_score(x: Tensor, h: Bandwidth = median_heuristic, kernel: str = "rbf",
              sq: Tensor | None = None) -> Tensor:
    """Kernel-density score ``g_i = Σ_j ∇_{x_i} k(x_i, x_j) / Σ_j k(x_i, x_j)``.

    Args:
        x: particles ``(..., M, D)``.
        h: bandwidth (float, tensor or heuristic on ``sq_dists(x)``).
        kernel: ``"rbf"``, ``"laplace"`` or ``"imq"``.
        sq: ``sq_dists(x)`` when the caller has it already.

    Returns:
        ``(..., M, D)``: the exact gradient of ``log Σ_j k(x, x_j)`` at ``x = x_i``,
        the gradient taken through the first argument only (the particles are the
        KDE's fixed centres) — D'Angelo & Fortuin (2021), eq. for WGD-KDE. The
        estimate is the score of ``ρ`` smoothed by the kernel, so it is biased
        towards 0 (for an RBF kernel and Gaussian ``ρ = N(μ, Σ)`` it tends to
        ``−(Σ + h/2 I)⁻¹ (x − μ)``).
    """
    sq = sq_dists(x) if sq is None else sq
    k, w = kernel_and_weights(kernel, sq, resolve_bandwidth(h, sq))
    return _apply(kde_operator(k, w), _centred(x))


def sge_score(
    x: Tensor, h: Bandwidth = median_heuristic, eta: float = 0.01, kernel: str = "rbf",
    sq: Tensor | None = None,
) -> Tensor:
    """Stein gradient estimator ``G = −(Kᵀ + ηI)⁻¹ ∇K`` (Li & Turner 2018).

    Args:
        x: particles ``(..., M, D)``.
        h: bandwidth (float, tensor or heuristic on ``sq_dists(x)``).
        eta: ridge ``η`` added to the kernel matrix (0.01 in the RDE code).
        kernel: ``"rbf"``, ``"laplace"`` or ``"imq"``.

    Returns:
        ``(..., M, D)`` with ``(∇K)_i = Σ_j ∇_{x_j} k(x_j, x_i)`` (gradient through
        the first argument of ``k``). Derivation: Stein's identity with test
        functions ``k(·, x_i)``, estimated on the particles, gives
        ``Σ_j k(x_j, x_i) g_j + Σ_j ∇_{x_j} k(x_j, x_i) ≈ 0``, i.e. ``KᵀG ≈ −∇K``;
        ridge-regularized. For a symmetric kernel this equals
        ``(K + ηI)⁻¹ Σ_j ∇_{x_i} k(x_i, x_j)``, the RDE code's form.
    """
    sq = sq_dists(x) if sq is None else sq
    k, w = kernel_and_weights(kernel, sq, resolve_bandwidth(h, sq))
    return _apply(sge_operator(k, w, eta), _centred(x))


def ssge_score(
    x: Tensor,
    h: Bandwidth = median_heuristic,
    eta: float = 0.01,
    num_eigen: int | None = None,
    eigen_ratio: float | None = None,
    y: Tensor | None = None,
    kernel: str = "rbf",
    sq: Tensor | None = None,
) -> Tensor:
    """Spectral Stein gradient estimator (Shi, Sun & Zhu 2018).

    Args:
        x: samples ``(..., M, D)`` of ``ρ``.
        h: bandwidth (float, scalar-per-matrix tensor, or heuristic on
            ``sq_dists(x)``). Must be symmetric (one value per kernel matrix):
            the method needs a symmetric eigendecomposition.
        eta: ridge added to ``K`` before the eigendecomposition (0.01 as the RDE
            code; 0 is the paper's estimator but blows up on the tiny eigenvalues
            of an RBF Gram matrix).
        num_eigen: keep the ``J`` largest eigenvalues; ``None`` keeps all (the
            reference code's default).
        eigen_ratio: alternatively keep the fewest largest eigenvalues whose sum is
            at least this fraction of the total (the paper's selection rule);
            combined with ``num_eigen``, both limits apply.
        y: points ``(..., N, D)`` at which to estimate the score; ``None`` means
            the samples themselves.
        kernel: ``"rbf"``, ``"laplace"`` or ``"imq"``.

    Returns:
        ``(..., N, D)`` (``N = M`` when ``y`` is ``None``).

    With ``K + ηI = U Λ Uᵀ``, the Nyström eigenfunctions are
    ``ψ_j(y) = (√M / λ_j) Σ_m u_mj k(y, x_m)`` and the coefficients
    ``β_j = −(1/M) Σ_m ∇ψ_j(x_m) = −(√M/M)(1/λ_j) Σ_n u_nj Σ_m ∇_{x_m} k(x_m, x_n)``,
    so ``g(y) = Σ_j ψ_j(y) β_j = −K_yx U Λ⁻² Uᵀ ∇K`` with ``∇K`` as in
    :func:`sge_score`. With all eigenvalues and ``η = 0`` this equals SGE at the
    samples. Departure from the RDE code: it re-applies the median heuristic to the
    ``(y, x)`` distances inside the Nyström step, so that eigenfunctions are
    evaluated with a different bandwidth from the decomposition's; we use the
    bandwidth of the samples throughout.
    """
    sq = sq_dists(x) if sq is None else sq
    h_t = resolve_bandwidth(h, sq) if callable(h) and not isinstance(h, Tensor) else h
    if isinstance(h_t, Tensor) and h_t.ndim >= 2 and h_t.shape[-2:] != (1, 1):
        raise ValueError(
            f"ssge_score needs one bandwidth per kernel matrix (symmetric K), got shape "
            f"{tuple(h_t.shape)}"
        )
    k, w = kernel_and_weights(kernel, sq, resolve_bandwidth(h_t, sq))
    k_yx = None if y is None else kernel_matrix(kernel, y, x, h_t)
    op = ssge_operator(k, w, eta, num_eigen=num_eigen, eigen_ratio=eigen_ratio, k_yx=k_yx)
    return _apply(op, _centred(x))


# ------------------------------------------------------------------- operators
# Every estimator here is linear in the particles once the kernel matrix is fixed:
# g = S x with an (N, M) operator S built from K and W (∇_x k(x, y) = W (x − y),
# kernels.kernel_and_weights). The operators are formed in float64 (the module note
# on precision) and annihilate constants (S 1 = 0). A caller whose particles are
# stored as several leaves (an ensemble's stacked layers) applies S leaf by leaf.


def kde_operator(k: Tensor, w: Tensor) -> Tensor:
    """``S`` with ``kde_score = S x``: ``S = (diag(W 1) − W) / (K 1)`` row-wise, float64."""
    first_op, _ = grad_sum_operators(w.to(torch.float64))
    return first_op / k.to(torch.float64).sum(-1, keepdim=True)


def sge_operator(k: Tensor, w: Tensor, eta: float = 0.01) -> Tensor:
    """``S`` with ``sge_score = S x``: ``S = −(Kᵀ + ηI)⁻¹ (Wᵀ − diag(Wᵀ 1))``, float64."""
    _, second_op = grad_sum_operators(w.to(torch.float64))
    a = k.to(torch.float64).mT + eta * _eye_like(k, torch.float64)
    # solve_ex without its error check: the check is a host read (a sync on a GPU)
    return -torch.linalg.solve_ex(a, second_op, check_errors=False)[0]


def ssge_operator(k: Tensor, w: Tensor, eta: float = 0.01, *, num_eigen: int | None = None,
                  eigen_ratio: float | None = None, k_yx: Tensor | None = None) -> Tensor:
    """``S`` with ``ssge_score = S x``: ``−K_yx U Λ⁻² Uᵀ (Wᵀ − diag(Wᵀ 1))``, float64,
    ``(N, M)`` (``K_yx = K`` at the samples themselves); see :func:`ssge_score`."""
    m = k.shape[-1]
    k64 = k.to(torch.float64)
    lam, u = torch.linalg.eigh(k64 + eta * _eye_like(k, torch.float64))  # ascending
    lam, u = lam.flip(-1), u.flip(-1)  # descending
    keep = torch.ones_like(lam, dtype=torch.bool)
    if num_eigen is not None:
        keep &= torch.arange(m, device=lam.device) < num_eigen
    if eigen_ratio is not None:
        frac = lam.cumsum(-1) / lam.sum(-1, keepdim=True)
        keep &= (frac - lam / lam.sum(-1, keepdim=True)) < eigen_ratio  # sum before j
    weight = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).pow(-2), 0.0)
    k_yx = k64 if k_yx is None else k_yx.to(torch.float64)
    _, second_op = grad_sum_operators(w.to(torch.float64))
    return -((k_yx @ u) * weight.unsqueeze(-2)) @ (u.mT @ second_op)


def _centred(x: Tensor) -> Tensor:
    """The particles minus their mean: the operators annihilate constants, and centring
    keeps the terms of each row from cancelling on particles far from the origin."""
    return x - x.mean(dim=-2, keepdim=True)


SCORE_ESTIMATORS: dict[str, Callable[..., Tensor]] = {
    "kde": kde_score,
    "sge": sge_score,
    "ssge": ssge_score,
}
"""Name → estimator ``(x, h=..., **options) -> (..., M, D)``."""

SCORE_OPERATORS: dict[str, Callable[..., Tensor]] = {
    "kde": lambda k, w, **_: kde_operator(k, w),
    "sge": lambda k, w, eta=0.01, **_: sge_operator(k, w, eta),
    "ssge": lambda k, w, eta=0.01, num_eigen=None, **_: ssge_operator(k, w, eta,
                                                                       num_eigen=num_eigen),
}
"""Name → ``(K, W, **options) -> S`` with the estimator's score ``g = S x`` (float64)."""
