"""Spaces in which members are compared: embeddings with an autograd path back.

Each embedding is a differentiable function of the stacked parameters, so an
update direction ``v`` computed in the embedding space returns to the weights
by a vector-Jacobian product (:func:`diverse.ensemble.pull_back`):
``Δw_m = J_m(w_m)ᵀ v_m``. The member axis stays first.

* weights: ``(M, D)``, the flattened parameters (Jacobian = identity);
* function outputs on a batch: ``(M, B·C)`` softmax probabilities (the
  repulsive-ensembles reference) or logits;
* input gradients of the true-label logit (FoRDE, seed 002):
  ``s_m(x_b) = ∇_x f_m(x_b)_{y_b}``, ``(M, B, D_in)``, normalized to unit
  length and rescaled by PCA lengthscales.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from diverse.ensemble import Ensemble, flatten_params


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

    ``basis`` ``(D_in, D_in)`` holds the eigenvectors U of the covariance of
    the standardized training inputs (columns), ``scale`` ``(D_in,)`` the
    per-coordinate factor sqrt((1 − α) + α λ_d), i.e. Σ_α⁻¹ = (1 − α)I + αΛ:
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


def pca_lengthscales(x_train: Tensor, alpha: float = 1.0) -> Lengthscales:
    """PCA lengthscales from the training inputs ``(N, ...)`` (computed once).

    Inputs are standardized per feature, the covariance ``(D_in, D_in)`` is
    eigendecomposed in float64; eigenvalues are clamped at 0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha = {alpha}: must lie in [0, 1]")
    x = x_train.reshape(len(x_train), -1).double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    cov = x.T @ x / (len(x) - 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    scale = ((1.0 - alpha) + alpha * eigvals.clamp_min(0.0)).sqrt()
    dtype = x_train.dtype
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


def input_gradient_embedding(grads: Tensor, lengthscales: Lengthscales) -> Tensor:
    """Input gradients ``(M, B, ...)`` → normalized, rescaled ``(M, B, D_in)``.

    ŝ = s / sqrt(‖s‖² + 1e-24) (FoRDE reference), then the metric of
    ``lengthscales``.
    """
    s = grads.reshape(grads.shape[0], grads.shape[1], -1)
    s = s / (s.square().sum(-1, keepdim=True) + 1e-24).sqrt()
    return lengthscales.apply(s)
