"""Spaces in which members are compared: embeddings with an autograd path back.

Each embedding is a differentiable function of the stacked parameters, so an
update direction ``v`` computed in the embedding space returns to the weights
by a vector-Jacobian product (:func:`diverse.nets.ensemble.pull_back`):
``Δw_m = J_m(w_m)ᵀ v_m``. The member axis stays first.

* weights: ``(M, D)``, the flattened parameters (Jacobian = identity); the
  weight-space particle methods work on the stacked leaves themselves
  (:func:`diverse.methods.particles.leaf_update`), never on this copy;
* function outputs on a batch: ``(M, B·C)`` softmax probabilities (the
  repulsive-ensembles reference) or logits;
* input gradients of the true-label logit (FoRDE, Trinh et al. 2024):
  ``s_m(x_b) = ∇_x f_m(x_b)_{y_b}``, ``(M, B, D_in)``, normalized to unit
  length and rescaled by PCA lengthscales.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from diverse.nets.ensemble import Ensemble, flatten_params


def weight_embedding(params: Mapping[str, Tensor]) -> Tensor:
    """``(M, D)``: each member's parameters, flattened (module order)."""
    return flatten_params(params)


def function_embedding(outputs: Tensor, output: str = "softmax") -> Tensor:
    """Member outputs ``(M, B, C)`` → function-space points ``(M, B·C)``.

    ``output = "softmax"`` (reference code) or ``"logits"``.
    """
    if output == "softmax":
        outputs = outputs.softmax(-1)
    elif output != "logits":
        raise ValueError(f"function output {output!r}: allowed softmax, logits")
    return outputs.reshape(outputs.shape[0], -1)


@dataclass(frozen=True)
class Lengthscales:
    """Input-space metric for input-gradient comparisons (FoRDE §3.3).

    ``basis`` ``(D_in, D_in)`` holds the eigenvectors U (columns) of the
    training inputs' second-moment matrix in the form :func:`pca_lengthscales`
    was asked for (the reference code's uncentred ``XᵀX/(N−1)`` by default),
    ``scale`` ``(D_in,)`` the per-coordinate factor sqrt((1 − α) + α λ_d),
    i.e. Σ_α⁻¹ = (1 − α)I + αΛ:
    α = 0 is the identity metric, α = 1 the reference code's PCA metric.
    """

    basis: Tensor | None
    scale: Tensor | None

    def apply(self, s: Tensor) -> Tensor:
        """``(..., D_in)`` gradients → coordinates in the chosen metric."""
        if self.basis is None:
            return s
        return (s @ self.basis) * self.scale


def identity_lengthscales() -> Lengthscales:
    return Lengthscales(None, None)


def pca_lengthscales(x_train: Tensor, alpha: float = 1.0, form: str = "reference",
                     *, chunk: int = 4096) -> Lengthscales:
    """PCA lengthscales from the training inputs ``(N, ...)``, computed once (FoRDE).

    Trinh, Heinonen, Acerbi & Kaski, "Input-gradient space particle inference
    for neural network ensembles" (ICLR 2024), §3.3. A pure function of
    ``x_train``: the inputs are flattened to X ``(N, D)`` and a second-moment
    matrix ``A (D, D)`` is accumulated in float64 (``chunk`` rows at a time,
    so no float64 copy of X is made), then ``A = U diag(λ) Uᵀ``
    (``torch.linalg.eigh``; ``A`` is symmetric PSD, so this equals the SVD the
    reference code uses). ``form``:

    * ``"reference"``: ``A = XᵀX / (N − 1)``, the *uncentred* second moment,
      with no per-feature centring or scaling. This is what the authors' code
      (AaltoPML/FoRDE ``calculate_pca.py``: ``empcov``, then ``svd``) computes
      on the training images normalized by the data set's per-channel
      mean/std, so pass inputs that are already normalized per channel; the
      top eigenvector is then close to the mean-image direction.
    * ``"covariance"``: ``A = XcᵀXc / (N − 1)`` with ``Xc = X − mean(X)``
      per feature (the centred covariance).
    * ``"correlation"``: each feature also divided by its std (clamped at
      1e-8): the correlation matrix, unit diagonal. This function's earlier
      (and, for backward compatibility, still its default) behaviour;
      FoRDE's config chooses ``"reference"`` by default.

    Returns ``Lengthscales(U, sqrt((1 − α) + α λ))`` in ``x_train``'s dtype,
    eigenvalues clamped at 0 and sorted in decreasing order like the SVD's
    (α = 1: ``scale = sqrt(λ)``, the code's lengthscales; α = 0: ones).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha = {alpha}: must lie in [0, 1]")
    if form not in ("reference", "covariance", "correlation"):
        raise ValueError(f"pca form {form!r}: allowed reference, covariance, correlation")
    x = x_train.reshape(len(x_train), -1)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"pca_lengthscales needs at least 2 inputs, got {n}")
    mean = None
    if form != "reference":
        mean = sum(x[i:i + chunk].double().sum(0) for i in range(0, n, chunk)) / n
    second = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk):
        rows = x[i:i + chunk].double()
        if mean is not None:
            rows = rows - mean
        second.addmm_(rows.T, rows)
    second /= n - 1
    return _lengthscales_of_moment(second, alpha, form, x_train.dtype)


def pca_lengthscales_from_batches(batches: Iterable[tuple[Tensor, Tensor]], alpha: float = 1.0,
                                  form: str = "reference") -> Lengthscales:
    """:func:`pca_lengthscales` in one pass over ``(x, y)`` batches (e.g. a ``DataLoader``).

    Accumulates ``N``, ``Σ x`` and ``Σ x xᵀ`` in float64, so the training inputs
    never need to fit in memory at once; the centred forms use
    ``XcᵀXc = XᵀX − N x̄ x̄ᵀ``. Agrees with :func:`pca_lengthscales` on the
    concatenated inputs up to float64 rounding.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha = {alpha}: must lie in [0, 1]")
    if form not in ("reference", "covariance", "correlation"):
        raise ValueError(f"pca form {form!r}: allowed reference, covariance, correlation")
    n, total, second, dtype = 0, None, None, torch.float32
    for x, _y in batches:
        rows = x.detach().reshape(len(x), -1)
        dtype = rows.dtype
        rows = rows.double()
        if second is None:
            second = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64,
                                 device=rows.device)
            total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
        second.addmm_(rows.T, rows)
        total += rows.sum(0)
        n += len(rows)
    if second is None or total is None or n < 2:
        raise ValueError(f"pca_lengthscales_from_batches needs at least 2 inputs, got {n}")
    if form != "reference":
        mean = total / n
        second -= n * torch.outer(mean, mean)
    return _lengthscales_of_moment(second / (n - 1), alpha, form, dtype)


def _lengthscales_of_moment(second: Tensor, alpha: float, form: str,
                            dtype: torch.dtype) -> Lengthscales:
    """Eigenpairs of a second-moment matrix ``(D, D)`` → :class:`Lengthscales`."""
    if form == "correlation":
        std = second.diagonal().sqrt().clamp_min(1e-8)
        second = second / std[:, None] / std[None, :]
    eigvals, eigvecs = torch.linalg.eigh(second)
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    scale = ((1.0 - alpha) + alpha * eigvals.clamp_min(0.0)).sqrt()
    return Lengthscales(eigvecs.to(dtype), scale.to(dtype))


def input_gradients(
    ensemble: Ensemble, params: Mapping[str, Tensor], x: Tensor, y: Tensor,
    *, create_graph: bool = True,
) -> tuple[Tensor, Tensor]:
    """True-label input gradients ``(M, B, *input_shape)`` and outputs ``(M, B, C)``.

    Every member gets its own copy of the batch (``per_member_input``) so the
    gradient of ``Σ_{m,b} f_m(x_{m,b})_{y_b}`` with respect to ``x_m`` is
    member m's own input gradient. With ``create_graph`` the result is
    differentiable in the parameters (double backward).
    """
    m = ensemble.members
    xs = x.detach().unsqueeze(0).expand(m, *x.shape).clone().requires_grad_(True)
    outputs = ensemble.apply(params, xs, per_member_input=True)
    picked = outputs.gather(-1, y.view(1, -1, 1).expand(m, -1, 1)).sum()
    (grad,) = torch.autograd.grad(picked, xs, create_graph=create_graph)
    return grad, outputs


