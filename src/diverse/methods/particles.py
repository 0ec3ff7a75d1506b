"""Repulsive particle methods: SVGD and WGD in weight and function space.

D'Angelo & Fortuin, "Repulsive deep ensembles are Bayesian" (NeurIPS 2021;
ratschlab/repulsive_ensembles). Members are particles w_i; each step moves them along

* WGD:  φ_i = a_t ∇ log p(w_i | D) − g_i, with g_i ≈ ∇ log ρ(w_i) estimated
  from the particles (KDE, SGE or SSGE, :mod:`diverse.math.scores`);
* SVGD: φ_i = (1/M) Σ_j [a_t k(w_j, w_i) ∇ log p(w_j | D) + ∇_{w_j} k(w_j, w_i)].

In function space (f-WGD, f-SVGD) the particles are the members' outputs on
the batch, f_i = softmax(f(X; w_i)) flattened to ``(M, B·C)``; the driving term
is ∇_f log p(y | f) + ∇_f log p_prior(f), where the function-space prior score
is estimated by SSGE from fresh weight-prior draws pushed through the network
on the same batch (as the reference code does); the update φ_f returns to the
weights by a vector-Jacobian product, Δw_i = J_i(X)ᵀ φ_f,i.

Units. The optimizer descends −φ expressed per training example: the driving
term is divided by N (so it equals a deep ensemble's gradient when a_t = 1) and
the repulsion by N as well (``repulsion_scale = "n"``, the exact posterior
scaling) or by the batch size B (``"batch"``: the tempering the FoRDE code
applies). The reference RDE code leaves the repulsion unscaled while the
likelihood is scaled by N; a reproduction measured the driving term ~10⁶×
larger than the repulsion — the ``driving_norm``/``repulsion_norm`` diagnostics
show this ratio for every run.

Sharded over processes (:mod:`diverse.nets.distributed`), each rank embeds its own
members, gathers all M embeddings and driving terms, computes φ for all
particles (the same numbers on every rank) and keeps its own rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diverse.errors import UserError
from diverse.math import kernels, scores
from diverse.math.annealing import ANNEALINGS
from diverse.methods.base import (
    Step,
    StepResult,
    TrainingData,
    interaction_logs,
    interaction_scales,
    member_diagnostics,
    member_gradients,
)
from diverse.methods.spaces import function_embedding
from diverse.nets.distributed import SINGLE, Comm
from diverse.nets.ensemble import Ensemble, Params, flatten_params, pull_back, unflatten_params

BANDWIDTHS: dict[str, kernels.Bandwidth] = {
    "median": kernels.median_heuristic,  # med(d²)/log(M+1)
    "median-rde": kernels.median_heuristic_rde,  # the RDE code's form (true median)
    "median-stein": kernels.median_heuristic_stein,  # 2·med(d²), the Stein-estimator papers
}
KERNEL_NAMES = tuple(kernels.KERNELS)
REPULSION_SCALES = ("n", "batch")


@dataclass(frozen=True)
class ParticleConfig:
    """The fields every particle method shares (abstract: :class:`SVGDConfig` and
    :class:`WGDConfig` are the configs).

    Fields:
        kernel: ``"rbf" | "laplace" | "imq"`` (default rbf).
        bandwidth: ``"median"`` (med(d²)/log(M+1), default), ``"median-rde"``
            (the RDE code: same with the true median), ``"median-stein"``
            (2·med(d²)), or ``"fixed"`` (use ``bandwidth_value``).
        bandwidth_value: the fixed bandwidth h in k = exp(−d²/h) (default 1).
        annealing: driving-term schedule a_t: ``constant | linear | hyper |
            cyclic`` (default constant); ``annealing_cycles`` for cyclic (4).
        driving_scale: γ, multiplies a_t (default 1; a reproduction used 0.01).
        repulsion_scale: ``"n"`` (exact posterior, default) or ``"batch"``.
        fgsm_epsilon: > 0 adds the likelihood of FGSM adversarial inputs
            x + ε·sign(∇_x NLL) per member to the driving term (default 0).
        output: function space only: ``"softmax"`` (reference; f-WGD) or ``"logits"``
            (required by f-SVGD, see :func:`build_f_svgd`).
        context_points: function space only: extra inputs drawn at random each
            step and appended to the batch for the repulsion and the prior
            (default 0), from ``context_source``: ``"train"`` (training
            inputs, default) or ``"box"`` (uniform in the training inputs'
            bounding box widened by 25% per side — for low-dimensional toys,
            so that the gaps between data are compared too).
        prior_samples: function space only: weight-prior draws for the SSGE
            estimate of the function-space prior score (0 = M; default 0).
            The weight prior is N(0, σ²) with σ = ``[train] prior_std``; with
            prior_std = 0 there is no prior term.
        lora_space: weight space of a LoRA ensemble (``members_as = "lora"``) only:
            ``"factors"`` (default) — the kernel compares the adapter factors
            ``(A, B)`` as they are; ``"delta"`` — it compares the effective updates
            ``ΔW = s·B A`` of every adapted layer (other member parameters as they
            are), which are invariant under LoRA's symmetry ``(B, A) → (B R⁻¹, R A)``
            (:func:`lora_delta_update`).
    """

    name: str = ""
    kernel: str = "rbf"
    bandwidth: str = "median"
    bandwidth_value: float = 1.0
    annealing: str = "constant"
    annealing_cycles: int = 4
    driving_scale: float = 1.0
    repulsion_scale: str = "n"
    fgsm_epsilon: float = 0.0
    output: str = "softmax"
    context_points: int = 0
    context_source: str = "train"
    prior_samples: int = 0
    lora_space: str = "factors"

    def __post_init__(self) -> None:
        """Valid once constructed: a one-line UserError naming the bad value."""
        _check(self)


@dataclass(frozen=True)
class SVGDConfig(ParticleConfig):
    """``[method] name = "svgd"`` (weight space) or ``"f-svgd"`` (function space): the
    :class:`ParticleConfig` fields."""

    name: str = "svgd"


@dataclass(frozen=True)
class WGDConfig(ParticleConfig):
    """``[method] name = "wgd"`` or ``"f-wgd"``: the :class:`ParticleConfig` fields plus

    Fields:
        estimator: score estimator of the particle density: ``"kde" | "sge" |
            "ssge"`` (default kde).
        eta: SGE/SSGE ridge η (default 0.01, the reference code).
        num_eigen: SSGE eigenfunctions kept (0 = all, the reference code).
    """

    name: str = "wgd"
    estimator: str = "kde"
    eta: float = 0.01
    num_eigen: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.estimator not in scores.SCORE_ESTIMATORS:
            raise UserError(f"[method] estimator = {self.estimator!r}: allowed "
                            f"{', '.join(scores.SCORE_ESTIMATORS)}")
        if self.estimator == "ssge" and self.kernel != "rbf":
            raise UserError(f"[method] kernel = {self.kernel!r}: SSGE needs kernel = 'rbf'")


def _check(cfg: ParticleConfig) -> None:
    def choice(key: str, allowed: tuple[str, ...]) -> None:
        value = getattr(cfg, key)
        if value not in allowed:
            raise UserError(f"[method] {key} = {value!r}: allowed {', '.join(allowed)}")

    choice("kernel", KERNEL_NAMES)
    choice("bandwidth", (*BANDWIDTHS, "fixed"))
    choice("annealing", ANNEALINGS)
    choice("repulsion_scale", REPULSION_SCALES)
    choice("output", ("softmax", "logits"))
    choice("context_source", ("train", "box"))
    choice("lora_space", ("factors", "delta"))
    if cfg.bandwidth == "fixed" and not cfg.bandwidth_value > 0:
        raise UserError(f"[method] bandwidth_value = {cfg.bandwidth_value}: must be > 0")
    for key in ("fgsm_epsilon", "context_points", "prior_samples"):
        if getattr(cfg, key) < 0:
            raise UserError(f"[method] {key} = {getattr(cfg, key)}: must be >= 0")


def bandwidth_of(cfg: ParticleConfig) -> kernels.Bandwidth:
    return cfg.bandwidth_value if cfg.bandwidth == "fixed" else BANDWIDTHS[cfg.bandwidth]


# ----------------------------------------------------------------- repulsion
@dataclass(frozen=True)
class Interaction:
    """One particle update as ``(M, M)`` operators, float64: ``φ = A d − R z``.

    Every update here is linear in the particles ``z`` and their driving terms
    ``d`` once the kernel matrix is fixed (:mod:`diverse.math.scores`,
    operators), so the ``M × M`` algebra is done once and the ``(M, D)`` work is
    one or two matrix products per parameter leaf — no flattened copy of the
    weights, no elementwise passes over them.

    Attributes:
        drive: ``A``; a float ``a`` means ``a·I`` (WGD: each particle's own term).
        repel: ``R``; the repulsion is ``R z`` (WGD: ``c·S`` with ``S`` the score
            estimator's operator; SVGD: ``−(c/M)(Wᵀ − diag(Wᵀ1))``).
        k: the kernel matrix ``(M, M)``; h: the bandwidth (for the diagnostics).
    """

    drive: Tensor | float
    repel: Tensor
    k: Tensor
    h: Tensor


#: ``(sq (M, M) float64, a, c) -> Interaction``: the M × M part of a particle update.
Interactor = Callable[[Tensor, float, float], Interaction]
#: ``(z (M, D), d (M, D), a, c) -> (φ (M, D), logs)``: an update on points in one tensor.
Repulsion = Callable[[Tensor, Tensor, float, float], tuple[Tensor, dict[str, Tensor]]]


def wgd_interaction(cfg: WGDConfig) -> Interactor:
    """φ = a·d − c·ĝ with ĝ = S z the estimated score of the particle density."""
    h = bandwidth_of(cfg)
    operator = scores.SCORE_OPERATORS[cfg.estimator]
    options: dict[str, Any] = {}
    if cfg.estimator in ("sge", "ssge"):
        options["eta"] = cfg.eta
    if cfg.estimator == "ssge" and cfg.num_eigen > 0:
        options["num_eigen"] = cfg.num_eigen

    def interaction(sq: Tensor, a: float, c: float) -> Interaction:
        hv = kernels.resolve_bandwidth(h, sq)
        k, w = kernels.kernel_and_weights(cfg.kernel, sq, hv)
        return Interaction(a, c * operator(k, w, **options), k, hv)

    return interaction


def svgd_interaction(cfg: ParticleConfig) -> Interactor:
    """φ_i = (1/M) Σ_j [a·k(z_j, z_i) d_j + c·∇_{z_j} k(z_j, z_i)]."""
    h = bandwidth_of(cfg)

    def interaction(sq: Tensor, a: float, c: float) -> Interaction:
        hv = kernels.resolve_bandwidth(h, sq)
        k, w = kernels.kernel_and_weights(cfg.kernel, sq, hv)
        _, second_op = kernels.grad_sum_operators(w)
        m = sq.shape[-1]
        return Interaction((a / m) * k.mT, (-c / m) * second_op, k, hv)  # φ = A d − R z

    return interaction


def on_points(interactor: Interactor) -> Repulsion:
    """The update on points held in one tensor ``z (M, D)`` (function space, tests)."""

    def direction(z: Tensor, drive: Tensor, a: float, c: float
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        it = interactor(kernels.sq_dists(z).to(torch.float64), a, c)
        zc = z - z.mean(0, keepdim=True)  # R annihilates constants; centring keeps precision
        driving = it.drive * drive if isinstance(it.drive, float) else _mm(it.drive, drive)
        repulsion = _mm(it.repel, zc)
        logs = _diagnostics(it, driving.norm(dim=-1), repulsion.norm(dim=-1))
        return driving - repulsion, logs

    return direction


def wgd_direction(cfg: WGDConfig) -> Repulsion:
    return on_points(wgd_interaction(cfg))


def svgd_direction(cfg: ParticleConfig) -> Repulsion:
    return on_points(svgd_interaction(cfg))


def _mm(op64: Tensor, x: Tensor) -> Tensor:
    """``op64 @ x`` with the float64 operator rounded to ``x``'s dtype."""
    return op64.to(x.dtype) @ x


def leaf_update(it: Interaction, grads: Params, leaves: Params, all_grads: Params | None,
                comm: Comm = SINGLE) -> tuple[Params, Tensor]:
    """−φ on stacked leaves: ``A g + R x`` per leaf, one or two products each.

    Args:
        it: the interaction of all M particles.
        grads: this rank's driving gradients ``g = −d`` (``∇(−log p)/N``) per leaf;
            with a diagonal ``A`` (WGD) the update is accumulated into them in place.
        leaves: every member's parameters per leaf, ``(M, ...)`` (gathered when sharded).
        all_grads: every member's ``g`` per leaf when ``A`` mixes members (SVGD).
        comm: the sharding; this rank's rows of the operators are applied.

    Returns:
        ``{name: (M/R, ...)}``, the gradient the optimizer descends, and this rank's
        members' norms ``(M/R,)`` of the driving term ``A d`` (read from ``A g``
        before the repulsion is added: no Gram matrix of the gradients is needed).
    """
    first = next(iter(grads.values()))
    repel = comm.local(it.repel).to(first.dtype)  # the operators in the leaves' dtype, once
    drive = it.drive if isinstance(it.drive, float) else comm.local(it.drive).to(first.dtype)
    out, norms = {}, []
    for name, g in grads.items():
        x = leaves[name].reshape(leaves[name].shape[0], -1)
        if isinstance(drive, float):  # WGD: a·g + R x, one product accumulated into g
            rows = g.reshape(g.shape[0], -1)
            norms.append(torch.linalg.vector_norm(rows, dim=1))
            step = rows.addmm_(repel, x, beta=drive)
        else:
            assert all_grads is not None
            step = drive @ all_grads[name].reshape(x.shape[0], -1)
            norms.append(torch.linalg.vector_norm(step, dim=1))
            step.addmm_(repel, x)
        out[name] = step.view(g.shape)
    driving = torch.linalg.vector_norm(torch.stack(norms, 1).double(), dim=1)
    return out, abs(drive) * driving if isinstance(drive, float) else driving


def repulsion_norms(it: Interaction, gram: Tensor) -> Tensor:
    """Per-member norms ``(M,)`` of the repulsion ``R z``, from the particles' Gram matrix
    (``‖(R z)_i‖² = (R G Rᵀ)_ii``)."""
    return (it.repel @ gram @ it.repel.mT).diagonal().clamp_min(0).sqrt()


def _diagnostics(it: Interaction, driving_norms: Tensor, repulsion_norms: Tensor
                 ) -> dict[str, Tensor]:
    """Bandwidth, mean off-diagonal kernel value, mean per-member norms of the terms
    (0-dim tensors: read by the loop when it logs, no host sync here)."""
    k = it.k
    m = k.shape[-1]
    off = (k.sum() - k.diagonal().sum()) / max(m * (m - 1), 1)
    return {"bandwidth": it.h.mean(), "kernel_mean": off,
            **interaction_logs(driving_norms, repulsion_norms)}


# -------------------------------------------------------------- driving terms
def fgsm_inputs(step: Step, params: Params, epsilon: float) -> Tensor:
    """Per-member FGSM inputs x + ε·sign(∇_x NLL_m(x)), ``(M, B, ...)``."""
    ens = step.ensemble
    xs = step.x.detach().unsqueeze(0).expand(ens.members, *step.x.shape).clone()
    xs.requires_grad_(True)
    detached = {k: v.detach() for k, v in params.items()}
    nll = step.likelihood.nll(ens.apply(detached, xs, per_member_input=True), step.y).sum()
    (gx,) = torch.autograd.grad(nll, xs)
    return (xs + epsilon * gx.sign()).detach()


def adversarial_nll(step: Step, params: Params, epsilon: float) -> Tensor:
    """Per-member mean NLL on FGSM inputs, ``(M,)`` (0 when ε = 0)."""
    if epsilon <= 0:
        first = next(iter(params.values()))
        return first.new_zeros(step.ensemble.members)
    xs = fgsm_inputs(step, params, epsilon)
    out = step.ensemble.apply(params, xs, per_member_input=True)
    return step.target.nll(out, step.y)


# ---------------------------------------------------------------- the updates
def weight_space(cfg: ParticleConfig, interactor: Interactor) -> Callable[[Step], StepResult]:
    """A weight-space particle update: the particles are the members' weights.

    The interaction is computed on the stacked parameter leaves: squared distances
    from the float64 sum of per-leaf Gram matrices, the update as ``A g + R x`` per
    leaf (:func:`leaf_update`), the repulsion's norms from the same Gram.
    """

    def update(step: Step) -> StepResult:
        params = step.ensemble.params
        a, c = interaction_scales(cfg, step)
        outputs = step.ensemble.apply(params, step.x)
        loss = step.target.loss(outputs, step.y, params)
        loss = loss + adversarial_nll(step, params, cfg.fgsm_epsilon)
        grads = member_gradients(loss.sum(), params)  # g = −∇ log p(w|D) / N
        if cfg.lora_space == "delta":
            if step.comm.size > 1:
                raise UserError("[method] lora_space = 'delta' runs in one process")
            update_grads, logs = lora_delta_update(
                interactor, lora_pairs(step.ensemble), grads,
                {k: v.detach() for k, v in params.items()}, a, c)
            logs.update(member_diagnostics(outputs.detach(), step.likelihood), anneal=a)
            return StepResult(loss=loss.detach(), outputs=outputs.detach(), grads=update_grads,
                              logs=logs)
        comm = step.comm  # sharded: the interaction of all M particles, this rank's rows kept
        leaves = gather_leaves(comm, {k: v.detach() for k, v in params.items()})
        gram = kernels.gram(leaves.values())
        it = interactor(kernels.sq_dists_from_gram(gram), a, c)
        mixes = not isinstance(it.drive, float)  # SVGD's driving term mixes members
        all_grads = gather_leaves(comm, grads) if mixes else None
        update_grads, driving = leaf_update(it, grads, leaves, all_grads, comm)
        logs = _diagnostics(it, comm.gather(driving), repulsion_norms(it, gram))
        logs.update(member_diagnostics(comm.gather(outputs.detach()), step.likelihood), anneal=a)
        return StepResult(loss=loss.detach(), outputs=outputs.detach(), grads=update_grads,
                          logs=logs)

    return update


def lora_pairs(ensemble: Ensemble) -> list[tuple[str, str, float]]:
    """``(A name, B name, scaling s)`` of every LoRA adapter among the member parameters
    (``ΔW = s·B A``); UserError if the ensemble has none."""
    pairs = []
    for prefix, module in ensemble.module.named_modules():
        adapters_a = getattr(module, "lora_A", None)
        if not isinstance(adapters_a, torch.nn.ModuleDict):
            continue
        for adapter in adapters_a:
            a_name = f"{prefix}.lora_A.{adapter}.weight"
            b_name = f"{prefix}.lora_B.{adapter}.weight"
            if a_name in ensemble.params and b_name in ensemble.params:
                pairs.append((a_name, b_name, float(module.scaling[adapter])))
    if not pairs:
        raise UserError("[method] lora_space = 'delta' needs a LoRA ensemble "
                        "(members_as = 'lora'); this one has no adapters")
    return pairs


def lora_delta_update(interactor: Interactor, pairs: list[tuple[str, str, float]],
                      grads: Params, leaves: Params, a: float, c: float
                      ) -> tuple[Params, dict[str, Tensor]]:
    """−φ of a weight-space particle method whose kernel compares LoRA updates ``ΔW``.

    The particles keep their parameters ``w`` (the factors); the kernel is
    ``k(w, w') = κ(e(w), e(w'))`` with ``e(w)`` every adapted layer's ``ΔW = s·B A``
    (flattened per member, ``(M, O, I)``) and the other member parameters as they are
    — a positive-definite kernel on ``w``, blind to the symmetry ``(B, A) → (BR⁻¹, RA)``.
    With ``c_ij = −R_ij`` (``R`` annihilates constants: ``(R e)_i = Σ_j c_ij (e_i − e_j)``):

    * SVGD: the repulsion ``Σ_j ∇_{w_j} k(w_j, w_i)`` is ``Σ_j c_ij J(w_j)ᵀ (e_i − e_j)``,
      the Jacobian at the *other* particle; for ``ΔW = sBA``, ``J(w)ᵀ U = (s U Aᵀ, s Bᵀ U)``
      for ``(B, A)``, so the sum is two contractions per layer;
    * WGD (a score estimate at each particle): ``J(w_i)ᵀ (R e)_i``, the pull-back of the
      e-space score to the particle's own factors.

    The driving term ``A g`` stays in the parameters. Returns the gradient for the
    optimizer ``A g + repulsion`` and the diagnostics (norms in e-space).
    """
    of_pair = {n for pair in pairs for n in pair[:2]}
    first = next(iter(grads.values()))
    m = first.shape[0]
    deltas = {b: (s * leaves[b].reshape(m, leaves[b].shape[1], -1)
                  @ leaves[a_].reshape(m, leaves[a_].shape[1], -1))
              for a_, b, s in pairs}
    blocks = [*deltas.values(), *(v for k, v in leaves.items() if k not in of_pair)]
    gram = kernels.gram(blocks)
    it = interactor(kernels.sq_dists_from_gram(gram), a, c)
    mixes = not isinstance(it.drive, float)
    repel = it.repel.to(first.dtype)
    out, norms = {}, []
    for name, g in grads.items():
        rows = g.reshape(m, -1)
        step = rows * it.drive if not mixes else it.drive.to(first.dtype) @ rows
        norms.append(torch.linalg.vector_norm(step, dim=1))
        if name not in of_pair:
            step = step + repel @ leaves[name].reshape(m, -1)
        out[name] = step.view(g.shape)
    coef = -repel.clone()
    coef.diagonal().zero_()  # c_ij, j ≠ i
    for a_name, b_name, s in pairs:
        e = deltas[b_name]  # (M, O, I)
        a_f = leaves[a_name].reshape(m, leaves[a_name].shape[1], -1)  # (M, r, I)
        b_f = leaves[b_name].reshape(m, leaves[b_name].shape[1], -1)  # (M, O, r)
        if mixes:  # SVGD: Σ_j c_ij J(w_j)ᵀ (e_i − e_j)
            grad_b = s * (torch.einsum("ij,ioI,jrI->ior", coef, e, a_f)
                          - torch.einsum("ij,joI,jrI->ior", coef, e, a_f))
            grad_a = s * (torch.einsum("ij,jor,ioI->irI", coef, b_f, e)
                          - torch.einsum("ij,jor,joI->irI", coef, b_f, e))
        else:  # WGD: J(w_i)ᵀ (R e)_i
            u = (repel @ e.reshape(m, -1)).view_as(e)
            grad_b = s * u @ a_f.mT
            grad_a = s * b_f.mT @ u
        out[b_name] = out[b_name] + grad_b.reshape(out[b_name].shape)
        out[a_name] = out[a_name] + grad_a.reshape(out[a_name].shape)
    driving = torch.linalg.vector_norm(torch.stack(norms, 1).double(), dim=1)
    return out, _diagnostics(it, driving, repulsion_norms(it, gram))


def gather_leaves(comm: Comm, leaves: Params) -> Params:
    """Every member's rows of stacked leaves: one gather of the flattened rows when
    sharded (views into it come back), the leaves themselves in one process."""
    if comm.size == 1:
        return dict(leaves)
    return unflatten_params(comm.gather(flatten_params(leaves)),
                            {k: v[:1].expand(comm.size * v.shape[0], *v.shape[1:])
                             for k, v in leaves.items()})


def prior_draws(params: Params, count: int, std: float,
                out: dict[str, Tensor] | None = None) -> Params:
    """``count`` draws from the weight prior N(0, std²), stacked like ``params``.

    ``normal_(0, std)`` into ``out``'s buffers when their shapes match (a caller
    reusing them across steps saves an 8 MB allocation a step for a 10-member
    784-200-200-10 MLP): the same numbers as ``torch.randn(...) * std`` from the
    same generator state, in one pass instead of two. (Filling parts of a leaf on
    several threads, each with its own generator, halved the draws alone but made
    the whole f-WGD step 40% slower on 2 cores: the threads compete with the
    step's own parallel work.)
    """
    draws = {}
    for k, v in params.items():
        shape = (count, *v.shape[1:])
        buf = None if out is None else out.get(k)
        if buf is None or buf.shape != shape or buf.dtype != v.dtype or buf.device != v.device:
            buf = torch.empty(shape, dtype=v.dtype, device=v.device)
            if out is not None:
                out[k] = buf
        draws[k] = buf.normal_(0.0, std)
    return draws


def function_space(cfg: ParticleConfig, direction: Repulsion,
                   x_pool: Tensor | None = None) -> Callable[[Step], StepResult]:
    """A function-space particle update, pulled back to the weights by a VJP."""
    draw_buffers: dict[str, Tensor] = {}  # the prior draws' storage, reused every step

    def update(step: Step) -> StepResult:
        ens, params = step.ensemble, step.ensemble.params
        a, c = interaction_scales(cfg, step)
        b = len(step.x)
        x = step.x
        if cfg.context_points > 0 and x_pool is not None:
            x = torch.cat([x, context_inputs(cfg, x_pool).to(x.device)])
        outputs = ens.apply(params, x)
        f = function_embedding(outputs, cfg.output)  # (M, B'·C), differentiable
        # driving in function space: ∇_f (1/B) Σ_b log p(y_b | f_b)  (= ∇_f log p(y|f) / N · N/B)
        f_leaf = f.detach().requires_grad_(True)
        shaped = f_leaf.view(outputs.shape)[:, :b]
        logits = shaped.clamp_min(1e-30).log() if cfg.output == "softmax" else shaped
        nll = step.target.nll(logits, step.y)
        (drive,) = torch.autograd.grad(-nll.sum(), f_leaf)
        comm = step.comm  # sharded: the interaction of all M particles, this rank's rows kept
        f_all, drive = comm.gather(f.detach()), comm.gather(drive)
        prior = _function_prior_score(cfg, step, x, f_all, draw_buffers)
        if prior is not None:
            drive = drive + prior / step.n_train
        phi, logs = direction(f_all, drive, a, c)
        grads = pull_back(f, params, -comm.local(phi))
        adv = adversarial_nll(step, params, cfg.fgsm_epsilon)
        if cfg.fgsm_epsilon > 0:
            extra = member_gradients(a * adv.sum(), params)
            grads = {k: g + extra[k] for k, g in grads.items()}
        logs.update(member_diagnostics(comm.gather(outputs[:, :b].detach()), step.likelihood),
                    anneal=a)
        return StepResult(loss=(nll + adv).detach(), outputs=outputs[:, :b].detach(),
                          grads=grads, logs=logs)

    return update


#: Training inputs kept for context points when the data stream (a loader, not a tensor).
CONTEXT_POOL = 10_000


def context_pool(cfg: ParticleConfig, data: TrainingData | None) -> Tensor | None:
    """The inputs context points are drawn from: all training inputs of a tensor, the
    first :data:`CONTEXT_POOL` of a stream, None without data or context points."""
    if data is None or cfg.context_points <= 0:
        return None
    if data.inputs is not None:
        return data.inputs
    return data.head(CONTEXT_POOL) if data.batches is not None else None


def context_inputs(cfg: ParticleConfig, x_pool: Tensor) -> Tensor:
    """``cfg.context_points`` inputs from the training pool or its widened box."""
    if cfg.context_source == "train":
        return x_pool[torch.randint(0, len(x_pool), (cfg.context_points,))]
    low, high = x_pool.min(0).values, x_pool.max(0).values
    low, high = low - 0.25 * (high - low), high + 0.25 * (high - low)
    u = torch.rand((cfg.context_points, *x_pool.shape[1:]), dtype=x_pool.dtype)
    return low + u * (high - low)


@torch.no_grad()
def _function_prior_score(cfg: ParticleConfig, step: Step, x: Tensor, f: Tensor,
                          buffers_for_draws: dict[str, Tensor] | None = None) -> Tensor | None:
    """SSGE estimate of ∇_f log p_prior(f) at the particles ``f (M, B'·C)``, from prior draws.

    Sharded (``step.comm``), every rank draws the same ``count`` prior samples
    (same generator state) and, when ``count`` divides evenly, pushes only its
    share through the network; the function draws are then gathered.
    """
    if step.prior_std <= 0:
        return None
    ens: Ensemble = step.ensemble
    comm = step.comm
    count = cfg.prior_samples or ens.members * comm.size
    draws = prior_draws(ens.params, count, step.prior_std, out=buffers_for_draws)
    share = comm if count % comm.size == 0 else SINGLE
    draws = {k: share.local(v) for k, v in draws.items()}
    n = count // share.size
    buffers = {k: v[:1].expand(n, *v.shape[1:]).clone() for k, v in ens.member_buffers.items()}
    out = ens.apply(draws, x, buffers=buffers)
    f_prior = share.gather(function_embedding(out, cfg.output))
    return scores.ssge_score(f_prior, kernels.median_heuristic, eta=0.01, y=f.detach())


# ------------------------------------------------------------------ builders
def build_svgd(cfg: SVGDConfig, data: TrainingData | None = None) -> Callable[[Step], StepResult]:
    return weight_space(cfg, svgd_interaction(cfg))


def build_wgd(cfg: WGDConfig, data: TrainingData | None = None) -> Callable[[Step], StepResult]:
    return weight_space(cfg, wgd_interaction(cfg))


def build_f_svgd(cfg: SVGDConfig, data: TrainingData | None = None) -> Callable[[Step], StepResult]:
    if cfg.output == "softmax":
        # f-SVGD mixes the members' driving terms through the kernel: with softmax outputs
        # member j's ∇_p log p_j(y) = 1/p_j(y) reaches member i without j's softmax
        # Jacobian, which cancels it in f-WGD. One confidently wrong member then sends a
        # ~1e15 step to every member (measured: Fashion-MNIST MLP, driving norm 1e15,
        # train accuracy 0.42 after 100 steps; with logits 0.77).
        raise UserError("[method] output = 'softmax': f-svgd needs output = \"logits\" (its "
                        "kernel-weighted driving term 1/p(y) of other members is unbounded "
                        "on the softmax)")
    pool = context_pool(cfg, data)
    return function_space(cfg, svgd_direction(cfg), pool)


def build_f_wgd(cfg: WGDConfig, data: TrainingData | None = None) -> Callable[[Step], StepResult]:
    pool = context_pool(cfg, data)
    return function_space(cfg, wgd_direction(cfg), pool)
