"""FoRDE: repulsion in the space of input gradients (Trinh et al., ICLR 2024).

Trinh, Heinonen, Acerbi & Kaski, "Input-gradient space particle inference for
neural network ensembles" (ICLR 2024). Each member's true-label input gradient
s_i(x_b) = ∇_x f_i(x_b)_{y_b} is, in the order of the reference code
(AaltoPML/FoRDE ``train_forde.py``), projected on the eigenvectors U of the
training inputs' second-moment matrix, normalized, ŝ = s/sqrt(‖s‖² + eps),
and coordinate d scaled by sqrt(λ_d): the metric Σ_α⁻¹ = (1 − α)I + αΛ
(α = 1: "PCA lengthscales", the reference code; α = 0: the identity
metric; ``lengthscales = "identity"``: no projection, no scaling). U and λ follow the code's
``calculate_pca.py`` by default: the *uncentred* second moment XᵀX/(N − 1)
of the per-channel-normalized training inputs (``pca = "reference"``; see
:func:`diverse.methods.spaces.pca_lengthscales` for the centred ``"covariance"`` and
per-pixel-standardized ``"correlation"`` options, which change the
repulsion gradient substantially).
Per example b, κ_ijb = exp(−‖ŝ_i(x_b) − sg(ŝ_j(x_b))‖² / h_jb) with
h_jb = median_i d²_ijb / log M (self-distance included); k_ij = mean_b κ_ijb.
The objective

    Σ_i [ a_t·(mean_b NLL_i + prior_i) ] + c · Σ_i log Σ_j k_ij

is minimized by double backpropagation through the input gradients; its
repulsive part is exactly a WGD step with a KDE score estimate in
input-gradient space. ``c = 1/B`` in the reference code (an effective
tempering); ``repulsion_scale = "n"`` gives the posterior's 1/N.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diverse.errors import UserError
from diverse.math import kernels
from diverse.math.annealing import ANNEALINGS
from diverse.methods.base import (
    Step,
    StepResult,
    TrainingData,
    interaction_logs,
    interaction_scales,
    member_diagnostics,
    member_gradients,
    require_classification,
)
from diverse.methods.spaces import (
    Lengthscales,
    identity_lengthscales,
    input_gradients,
    pca_lengthscales,
    pca_lengthscales_from_batches,
)
from diverse.nets.distributed import SINGLE, Comm

PCA_FORMS = ("reference", "covariance", "correlation")


@dataclass(frozen=True)
class FoRDEConfig:
    """``[method] name = "forde"``.

    Fields:
        lengthscales: ``"pca"`` (default) or ``"identity"``.
        pca: the matrix whose eigenpairs (U, λ) give the PCA lengthscales,
            computed once from the training inputs (all the method receives,
            unaugmented; a tensor or one pass over a loader):
            ``"reference"`` (default) the uncentred second moment XᵀX/(N − 1),
            as the authors' ``calculate_pca.py`` (Trinh et al. 2024);
            ``"covariance"`` the centred covariance XcᵀXc/(N − 1);
            ``"correlation"`` the per-pixel-standardized correlation matrix
            (this library's behaviour before ``pca`` existed). The code
            normalizes the images by the data set's per-channel mean/std
            first; ``[data] normalize = true`` (default) already does that
            in the data pipeline (training-set per-channel statistics), so
            ``"reference"`` must not and does not standardize again. With
            ``normalize = false`` the moment is of the raw inputs (e.g.
            pixels in [0, 1]), dominated even more by the mean image: not
            the reference recipe.
        eps: ŝ = s/sqrt(‖s‖² + eps) (default 1e-12, the reference code's
            config value; the commands in its README pass 1e-24).
        alpha: α ∈ [0, 1] of Σ_α⁻¹ = (1 − α)I + αΛ (default 1, the reference
            code; ignored for identity lengthscales).
        repulsion_scale: ``"batch"`` (1/B, reference code, default) or ``"n"``.
        annealing: driving-term schedule (``constant`` default, ``linear``,
            ``hyper``, ``cyclic``); ``annealing_cycles`` (4).
        driving_scale: γ multiplying a_t (default 1).
        diagnostics_every: the norms of the driving and repulsion terms
            (``diag_driving_norm``, ``diag_repulsion_norm``, their ratio) are
            measured on every this-many-th step (default 10; 1 = every step):
            they need a separate backward pass of each term, while the other
            steps take one backward of their sum (the same update, one
            traversal of the network's backward less: 8–12% of a FoRDE step).
    """

    name: str = "forde"
    lengthscales: str = "pca"
    pca: str = "reference"
    eps: float = 1e-12
    alpha: float = 1.0
    repulsion_scale: str = "batch"
    annealing: str = "constant"
    annealing_cycles: int = 4
    driving_scale: float = 1.0
    diagnostics_every: int = 10

    def __post_init__(self) -> None:
        """Valid once constructed: a one-line UserError naming the bad value."""
        if not (isinstance(self.diagnostics_every, int) and self.diagnostics_every >= 1):
            raise UserError(f"[method] diagnostics_every = {self.diagnostics_every!r}: must be "
                            "an integer >= 1")
        if self.lengthscales not in ("pca", "identity"):
            raise UserError(f"[method] lengthscales = {self.lengthscales!r}: allowed pca, "
                            "identity")
        if self.pca not in PCA_FORMS:
            raise UserError(f"[method] pca = {self.pca!r}: allowed {', '.join(PCA_FORMS)}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise UserError(f"[method] eps = {self.eps}: must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"[method] alpha = {self.alpha}: must lie in [0, 1]")
        if self.repulsion_scale not in ("batch", "n"):
            raise UserError(f"[method] repulsion_scale = {self.repulsion_scale!r}: allowed "
                            "batch, n")
        if self.annealing not in ANNEALINGS:
            raise UserError(f"[method] annealing = {self.annealing!r}: allowed "
                            f"{', '.join(ANNEALINGS)}")


def forde_repulsion(s: torch.Tensor, comm: Comm = SINGLE) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-member log Σ_j k_ij from embeddings ``(M, B, D)``; returns ``(M,)``.

    Gradients flow through the first argument only (the second is detached).
    Sharded (``comm``), ``s`` holds this rank's members ``(M/R, B, D)``: the
    kernel is computed over all gathered members (bandwidths and diagnostics
    as in one process; only this rank's rows carry gradients) and this rank's
    ``(M/R,)`` rows are returned.
    """
    per_example = comm.gather(s).transpose(0, 1)  # (B, M, D)
    sq = kernels.sq_dists(per_example, per_example.detach())  # (B, M, M)
    h = kernels.median_heuristic_forde(sq.detach())  # (B, 1, M): per example b, column j
    kappa = torch.exp(-sq / h)
    k = kappa.mean(0)  # (M, M)
    m = k.shape[0]
    off = (k.sum() - k.diagonal().sum()) / max(m * (m - 1), 1)
    logs = {"bandwidth": float(h.mean()), "kernel_mean": float(off.detach())}
    return comm.local(k.sum(1).log()), logs


def forde_embedding(grads: torch.Tensor, metric: Lengthscales, eps: float) -> torch.Tensor:
    """Input gradients ``(M, B, ...)`` → FoRDE embeddings ``(M, B, D_in)``.

    The reference order: project on U (if any), normalize
    ŝ = s / sqrt(‖s‖² + eps), scale coordinate d by ``metric.scale``. U is
    orthogonal, so projecting first leaves ‖s‖ unchanged.
    """
    s = grads.reshape(grads.shape[0], grads.shape[1], -1)
    if metric.basis is not None:
        s = s @ metric.basis
    s = s / (s.square().sum(-1, keepdim=True) + eps).sqrt()
    return s if metric.scale is None else s * metric.scale


def metric_matrix(metric: Lengthscales) -> torch.Tensor | None:
    """``A = U diag(scale²) Uᵀ`` ``(D_in, D_in)``, with ‖e_i − e_j‖² = (ĝ_i − ĝ_j)ᵀ A (ĝ_i − ĝ_j)
    for the embeddings e = (ĝ U)·scale; None for the identity metric (A = I)."""
    if metric.basis is None:
        return None
    scale = metric.scale if metric.scale is not None else torch.ones(metric.basis.shape[1])
    return (metric.basis * scale.square().to(metric.basis.dtype)) @ metric.basis.mT


def forde_repulsion_terms(grads: torch.Tensor, metric_a: torch.Tensor | None, eps: float,
                          comm: Comm = SINGLE
                          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """FoRDE's repulsion and its gradient in input-gradient space, without autograd.

    Args:
        grads: this rank's true-label input gradients ``(M/R, B, ...)`` (detached).
        metric_a: ``A`` of :func:`metric_matrix` (None: identity).
        eps: ŝ = s / sqrt(‖s‖² + eps).
        comm: the sharding (all members' embeddings are gathered).

    Returns:
        ``log_k (M/R,)`` = log Σ_j k_ij as :func:`forde_repulsion` of
        :func:`forde_embedding`; ``v`` of ``grads``' shape, ``∂(Σ_i log_k_i)/∂s``
        with the second kernel argument held fixed (stop-gradient), as autograd
        gives through :func:`forde_repulsion`; the diagnostics.

    With ĝ = s/n, n = sqrt(‖s‖² + eps), P = ĝ A and per example b the Gram
    G_b = ĝ_b P_bᵀ, d²_bij = G_bii + G_bjj − 2 G_bij (= ‖e_ib − e_jb‖²);
    κ_bij = exp(−d²_bij / h_bj), k_ij = mean_b κ_bij and
    C_bij = −κ_bij / (B h_bj Σ_j k_ij). Then
    ∂L/∂ĝ_ib = 2 [(Σ_j C_bij) P_ib − Σ_j C_bij P_jb] and
    ∂L/∂s = (u − ĝ (ĝ·u)) / n. The one ``(M·B, D) × (D, D)`` product ĝ A is the
    whole cost of the PCA metric (autograd through the projection takes two).
    """
    shape = grads.shape
    s = grads.reshape(shape[0], shape[1], -1)
    norm = (s.square().sum(-1, keepdim=True) + eps).sqrt()
    unit = s / norm  # ĝ (M/R, B, D)
    proj = unit if metric_a is None else unit @ metric_a.to(unit.dtype)  # P = ĝ A
    unit_all = comm.gather(unit).transpose(0, 1)  # (B, M, D)
    proj_all = comm.gather(proj).transpose(0, 1)
    gram = unit_all @ proj_all.mT  # (B, M, M): ĝ_i · A ĝ_j
    diag = gram.diagonal(dim1=-2, dim2=-1)
    sq = (diag.unsqueeze(-1) + diag.unsqueeze(-2) - 2.0 * gram).clamp_min(0.0)
    sq = sq.masked_fill(torch.eye(sq.shape[-1], dtype=torch.bool, device=sq.device), 0.0)
    h = kernels.median_heuristic_forde(sq)  # (B, 1, M): per example b, column j
    kappa = torch.exp(-sq / h)
    k = kappa.mean(0)  # (M, M)
    row = k.sum(1)  # Σ_j k_ij
    b_count, m = sq.shape[0], sq.shape[-1]
    coef = -kappa / (h * (b_count * row).unsqueeze(-1))  # C_bij (B, M, M)
    coef = comm.local(coef.transpose(0, 1)).transpose(0, 1)  # this rank's rows i
    u = 2.0 * (coef.sum(-1, keepdim=True) * comm.local(proj_all.transpose(0, 1)).transpose(0, 1)
               - coef @ proj_all)  # (B, M/R, D)
    u = u.transpose(0, 1)  # (M/R, B, D)
    v = (u - unit * (unit * u).sum(-1, keepdim=True)) / norm
    off = (k.sum() - k.diagonal().sum()) / max(m * (m - 1), 1)
    logs = {"bandwidth": h.mean(), "kernel_mean": off}
    return comm.local(row.log()), v.reshape(shape), logs


def _norms(leaves: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-member norms ``(M,)`` of stacked leaves, one read of each (no flattened copy)."""
    return sum(torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).double().square()
               for v in leaves.values()).sqrt()


def build_forde(cfg: FoRDEConfig, data: TrainingData | None = None
                ) -> Callable[[Step], StepResult]:
    """The FoRDE update; PCA lengthscales are computed once from the training inputs
    (``data.inputs``, or one pass over ``data.batches``)."""
    require_classification("forde (true-label input gradients)", data)
    metric: Lengthscales = identity_lengthscales()
    if cfg.lengthscales == "pca":
        if data is None or (data.inputs is None and data.batches is None):
            raise UserError("[method] forde with PCA lengthscales needs the training inputs "
                            "(TrainingData inputs or batches), or lengthscales = \"identity\"")
        metric = (pca_lengthscales(data.inputs, cfg.alpha, cfg.pca) if data.inputs is not None
                  else pca_lengthscales_from_batches(data.batches, cfg.alpha, cfg.pca))

    metric_a = metric_matrix(metric)  # A = U diag(scale²) Uᵀ, once
    on_device: dict[torch.device, torch.Tensor | None] = {}

    def update(step: Step) -> StepResult:
        ens, params = step.ensemble, step.ensemble.params
        device = step.x.device
        if device not in on_device:
            on_device[device] = None if metric_a is None else metric_a.to(device)
        a, c = interaction_scales(cfg, step)
        grads_x, outputs = input_gradients(ens, params, step.x, step.y, create_graph=True)
        # the repulsion's gradient in input-gradient space, outside the autograd graph
        log_k, v, logs = forde_repulsion_terms(grads_x.detach(), on_device[device], cfg.eps,
                                               step.comm)
        loss = step.target.loss(outputs, step.y, params)
        # c·Σ log k's gradient in θ is the input gradients' VJP along c·v (double backward)
        repulsion = (grads_x * v).sum() * c
        if step.index % cfg.diagnostics_every == 0:  # each term alone: their norms
            drive = member_gradients(a * loss.sum(), params, retain_graph=True)
            repel = member_gradients(repulsion, params)
            norms = step.comm.gather(torch.stack([_norms(drive), _norms(repel)], 1))  # (M, 2)
            grads = {k: d.add_(repel[k]) for k, d in drive.items()}  # after the norms
            logs.update(interaction_logs(norms[:, 0], norms[:, 1]))
        else:  # one backward of the sum
            grads = member_gradients(a * loss.sum() + repulsion, params)
        logs.update(member_diagnostics(step.comm.gather(outputs.detach()), step.likelihood),
                    anneal=a)
        return StepResult(loss=loss.detach(), outputs=outputs.detach(), grads=grads, logs=logs)

    return update
