"""Centered kernel alignment (CKA): Gram matrices, centering, HSIC, CKA. Pure functions.

Conventions
-----------
* Features are rows: one member's features on a batch are ``(B, P)``; an ensemble's
  are ``(M, B, P)`` (member axis first, never folded into the batch). Convolutional
  maps ``(M, B, C, H, W)`` are turned into ``(M, B, C·H·W)`` by :func:`as_matrix`.
* Gram matrices are ``(..., B, B)``; every function is batched over the leading
  dimensions.
* Centering matrix ``H = I − (1/n) 1 1ᵀ`` with ``n = B``.
* ``HSIC_b(K, L) = tr(K H L H) / (n − 1)²`` (biased, Gretton et al. 2005) and the
  unbiased estimator of Song et al. (2012, JMLR, "Feature selection via dependence
  maximization", eq. 5); ``CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``
  (Kornblith et al., "Similarity of neural network representations revisited",
  ICML 2019).
* :func:`unit_grams` maps each member to a point on the unit sphere,
  ``k̂_m = vec(centered K_m) / ‖vec(centered K_m)‖``: with standard centering,
  ``⟨k̂_m, k̂_n⟩`` is the biased CKA. HE-CKA (:mod:`diverse.math.he_cka`; Smerkous, Bai &
  Fuxin, "Enhancing diversity in Bayesian deep learning via hyperspherical energy
  minimization of CKA", NeurIPS 2024; code Deep-Machine-Vision/he-cka-ensembles)
  spreads these points out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diverse.errors import UserError
from diverse.math import kernels

__all__ = [
    "CENTERINGS",
    "ESTIMATORS",
    "GRAM_KINDS",
    "as_matrix",
    "center",
    "cka",
    "cka_matrix",
    "gram",
    "hsic",
    "rbf_bandwidth",
    "unit_grams",
]

GRAM_KINDS = ("linear", "cosine", "rbf")
"""Feature kernels accepted by :func:`gram`."""

CENTERINGS = ("standard", "one-sided")
"""Centering modes accepted by :func:`center`."""

ESTIMATORS = ("biased", "unbiased")
"""HSIC estimators accepted by :func:`hsic`."""


def _check(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


# --------------------------------------------------------------------------- features


def as_matrix(features: Tensor, leading: int = 1) -> Tensor:
    """Flatten everything after the batch axis: ``(*lead, B, ...) -> (*lead, B, P)``.

    Args:
        features: ``leading`` leading dimensions (the member axis for ``leading = 1``),
            then the batch axis, then any feature dimensions (none, ``(P,)`` or
            ``(C, H, W)``).
        leading: number of dimensions before the batch axis.

    Returns:
        A view (or copy) of shape ``(*lead, B, P)``; ``P = 1`` when there are no
        feature dimensions, ``P = C·H·W`` for convolutional maps.
    """
    if leading < 0 or features.ndim < leading + 1:
        raise UserError(
            f"features of shape {tuple(features.shape)} have no batch axis after "
            f"{leading} leading dimension(s); expected at least {leading + 1} dimensions"
        )
    return features.reshape(*features.shape[: leading + 1], -1)


# --------------------------------------------------------------------------- Gram matrices


def rbf_bandwidth(sq: Tensor) -> Tensor:
    """Median-heuristic ``h²`` for the RBF Gram ``exp(−d²/(2h²))``.

    Args:
        sq: squared distances ``(..., B, B)`` between the rows of one feature matrix.

    Returns:
        ``h² = median_{i<j} d²_ij / 2`` of shape ``(..., 1, 1)``, detached. The median is
        the true median (mean of the two middle values) over the ``B(B−1)/2``
        off-diagonal pairs, so ``k = exp(−d²/median)`` equals ``e^{-1}`` at the median
        distance. A zero median (``B < 2``, or half the examples coincide) gives
        ``h² = 1``, never ``h = 0``.

    The reference code (``rbf_gram`` in he-cka-ensembles ``hyper/diversity/kernels.py``)
    instead takes ``torch.median`` of all ``B²`` entries (zeros on the diagonal
    included) and divides by ``2 log(B + 1)``: a much narrower kernel. We use the
    plain median of the distinct pairs, as in CKA practice (Kornblith et al. 2019).
    """
    sq = sq.detach()
    b = sq.shape[-1]
    if b < 2:
        return torch.ones(*sq.shape[:-2], 1, 1, dtype=sq.dtype, device=sq.device)
    rows, cols = torch.triu_indices(b, b, offset=1, device=sq.device)
    med = kernels.median(sq[..., rows, cols], dim=-1)
    h2 = torch.where(med > 0, med / 2.0, torch.ones_like(med))
    return h2.unsqueeze(-1).unsqueeze(-1)


def gram(features: Tensor, kind: str = "linear", eps: float = 1e-12) -> Tensor:
    """Gram matrix of the rows of ``features``.

    Args:
        features: ``(..., B, P)``, e.g. ``(M, B, P)`` for an ensemble (use
            :func:`as_matrix` for convolutional maps).
        kind: ``"linear"``: ``K = F Fᵀ``; ``"cosine"``: rows are first divided by
            ``sqrt(‖f_i‖² + eps)`` (a zero row stays zero), then ``F Fᵀ``; ``"rbf"``:
            ``K_ij = exp(−‖f_i − f_j‖² / (2h²))`` with ``h²`` from :func:`rbf_bandwidth`
            (median heuristic, detached, computed per leading index).
        eps: the cosine kernel's safety constant.

    Returns:
        ``(..., B, B)``, symmetric, differentiable with respect to ``features``.
    """
    _check("Gram kernel", kind, GRAM_KINDS)
    if features.ndim < 2:
        raise UserError(f"features must be (..., B, P), got shape {tuple(features.shape)}")
    if kind == "linear":
        return features @ features.mT
    if kind == "cosine":
        unit = features * torch.rsqrt((features * features).sum(-1, keepdim=True) + eps)
        return unit @ unit.mT
    sq = kernels.sq_dists(features)
    return torch.exp(-sq / (2.0 * rbf_bandwidth(sq)))


# --------------------------------------------------------------------------- centering


def center(K: Tensor, mode: str = "standard") -> Tensor:
    """Center Gram matrices ``(..., B, B)``.

    ``"standard"``: ``H K H``, i.e. both row and column means removed (the grand mean
    added back): the centering of HSIC and CKA.
    ``"one-sided"``: ``K H``, i.e. each ROW has its own mean subtracted,
    ``(K H)_ij = K_ij − (1/n) Σ_k K_ik``. This is what the HE-CKA reference code
    does (``center_gram``: ``gram − gram.mean(dim=2)``). The result is not symmetric,
    and ``⟨K H, L H⟩_F = tr(K L H)`` differs from ``⟨H K H, H L H⟩_F = tr(K H L H)``,
    so the cosine of one-sided-centered Grams is not CKA.
    """
    _check("centering", mode, CENTERINGS)
    K = K - K.mean(dim=-1, keepdim=True)
    if mode == "one-sided":
        return K
    return K - K.mean(dim=-2, keepdim=True)


# --------------------------------------------------------------------------- HSIC and CKA


def _zero_diagonal(K: Tensor) -> Tensor:
    eye = torch.eye(K.shape[-1], dtype=torch.bool, device=K.device)
    return K.masked_fill(eye, 0.0)


def hsic(K: Tensor, L: Tensor, estimator: str = "biased") -> Tensor:
    """Hilbert–Schmidt independence criterion between Gram matrices.

    Args:
        K, L: ``(..., n, n)`` Gram matrices (uncentered), broadcast over leading dims.
        estimator: ``"biased"``: ``tr(K H L H) / (n − 1)²`` (needs ``n ≥ 2``).
            ``"unbiased"`` (Song et al. 2012, needs ``n ≥ 4``), with ``K̃, L̃`` the
            Grams with zeroed diagonals:
            ``[tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3))``.

    Returns:
        ``(...)``.
    """
    _check("HSIC estimator", estimator, ESTIMATORS)
    n = K.shape[-1]
    if estimator == "biased":
        if n < 2:
            raise UserError(f"biased HSIC needs a batch of at least 2 examples, got {n}")
        return (center(K) * L.mT).sum((-2, -1)) / (n - 1) ** 2
    if n < 4:
        raise UserError(f"unbiased HSIC needs a batch of at least 4 examples, got {n}")
    kt, lt = _zero_diagonal(K), _zero_diagonal(L)
    trace = (kt * lt.mT).sum((-2, -1))
    sums = kt.sum((-2, -1)) * lt.sum((-2, -1)) / ((n - 1) * (n - 2))
    cross = (kt.sum(-2) * lt.sum(-1)).sum(-1)  # 1ᵀ K̃ L̃ 1 = Σ_j colsum(K̃)_j rowsum(L̃)_j
    return (trace + sums - 2.0 * cross / (n - 2)) / (n * (n - 3))


def cka(K: Tensor, L: Tensor, estimator: str = "biased") -> Tensor:
    """``CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))``, shape ``(...)``.

    NaN for a constant representation (``HSIC(K, K) = 0``), and possibly for the
    unbiased estimator on tiny batches, where ``HSIC_u(K, K)`` can be negative.
    """
    return hsic(K, L, estimator) / torch.sqrt(hsic(K, K, estimator) * hsic(L, L, estimator))


def _pairwise_hsic(K: Tensor, estimator: str) -> Tensor:
    """``HSIC(K_m, K_n)`` for all pairs of symmetric Grams ``(M, n, n)`` -> ``(M, M)``."""
    _check("HSIC estimator", estimator, ESTIMATORS)
    m, n = K.shape[0], K.shape[-1]
    if estimator == "biased":
        if n < 2:
            raise UserError(f"biased HSIC needs a batch of at least 2 examples, got {n}")
        kc = center(K).reshape(m, n * n)
        return kc @ kc.mT / (n - 1) ** 2
    if n < 4:
        raise UserError(f"unbiased HSIC needs a batch of at least 4 examples, got {n}")
    kt = _zero_diagonal(K)
    flat = kt.reshape(m, n * n)
    rows = kt.sum(-1)  # (M, n); = column sums by symmetry
    total = rows.sum(-1)  # (M,)
    trace = flat @ flat.mT
    sums = total[:, None] * total[None, :] / ((n - 1) * (n - 2))
    cross = rows @ rows.mT
    return (trace + sums - 2.0 * cross / (n - 2)) / (n * (n - 3))


def cka_matrix(features: Tensor, kernel: str = "linear", estimator: str = "biased") -> Tensor:
    """Pairwise CKA between all members, vectorized (matrix products, no pair loop).

    Args:
        features: ``(M, B, P)``.
        kernel: Gram kernel (see :func:`gram`).
        estimator: HSIC estimator (see :func:`hsic`).

    Returns:
        ``(M, M)`` symmetric, ``CKA[m, n] = CKA(K_m, K_n)``, unit diagonal.
    """
    if features.ndim != 3:
        raise UserError(
            f"cka_matrix expects features (M, B, P), got shape {tuple(features.shape)}; "
            "flatten convolutional maps with diverse.math.cka.as_matrix"
        )
    h = _pairwise_hsic(gram(features, kernel), estimator)
    d = h.diagonal()
    return h / torch.sqrt(d[:, None] * d[None, :])


# --------------------------------------------------------------------------- sphere points


def unit_grams(
    features: Tensor,
    kernel: str = "linear",
    centering: str = "standard",
    detach_diagonal: bool = True,
    eps: float = 1e-12,
) -> Tensor:
    """Each member's centered Gram as a unit vector: ``k̂_m = vec(K̄_m) / ‖vec(K̄_m)‖``.

    Args:
        features: ``(M, B, P)``.
        kernel: Gram kernel (see :func:`gram`).
        centering: ``"standard"`` (``H K H``, default) or ``"one-sided"`` (``K H``, the
            reference code), see :func:`center`.
        detach_diagonal: keep the Gram's diagonal values but stop gradients through
            them (before centering), as the reference code does by default.
            ``K_ii`` is an example's self-similarity (``‖f_i‖²`` for the linear kernel,
            the constant 1 for cosine and RBF): it says nothing about how examples
            relate to each other, and letting the diversity gradient act on it only
            lets members decorrelate by inflating or shrinking individual examples'
            feature norms. With it detached the repulsion acts through the
            cross-example similarities ``K_ij`` (``i ≠ j``) only. Values are unchanged.
        eps: the norm is clamped at ``eps`` (a constant representation gives a zero
            vector, not NaN). The reference divides by ``‖·‖ + eps`` instead, which
            biases the norm; clamping keeps ``‖k̂_m‖ = 1`` exactly.

    Returns:
        ``(M, B·B)``. With ``centering="standard"``, ``⟨k̂_m, k̂_n⟩`` is the biased CKA
        of members ``m`` and ``n`` (the ``(n − 1)²`` factors cancel).
    """
    if features.ndim != 3:
        raise UserError(
            f"unit_grams expects features (M, B, P), got shape {tuple(features.shape)}; "
            "flatten convolutional maps with diverse.math.cka.as_matrix"
        )
    _check("centering", centering, CENTERINGS)
    K = gram(features, kernel)
    if detach_diagonal:
        eye = torch.eye(K.shape[-1], dtype=torch.bool, device=K.device)
        K = torch.where(eye, K.detach(), K)
    flat = center(K, centering).reshape(K.shape[0], -1)
    return flat / torch.linalg.vector_norm(flat, dim=-1, keepdim=True).clamp_min(eps)
