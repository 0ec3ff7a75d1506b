"""Training methods: the per-step update on the stacked parameters.

A method is a function of a :class:`Step` (the ensemble, the batch, the
likelihood, the data-set size, the progress) that returns a
:class:`StepResult`: the per-member objective values ``(M,)``, the outputs
``(M, B, K)`` it computed on the batch, the gradient handed to the optimizer
for every stacked parameter, and scalar diagnostics. The optimizer then
descends that gradient. A particle method returns minus its update direction
φ; the deep ensemble returns the independent negative log-posterior gradients.

A builder takes the method's config dataclass and a :class:`TrainingData`
(what a method may precompute from the training data: PCA lengthscales, an
outlier pool, the full batch of HMC) and returns the update. A sampler that
moves the parameters itself (SGHMC, HMC) returns ``grads = None``: the loop
then takes no optimizer step. The name→builder table is
:data:`diverse.methods.catalog.METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from diverse.errors import UserError
from diverse.math.annealing import anneal
from diverse.nets.distributed import SINGLE, Comm
from diverse.nets.ensemble import Ensemble, Params
from diverse.nets.likelihoods import Likelihood


@runtime_checkable
class MethodConfig(Protocol):
    """What every ``[method]`` config is: a frozen dataclass with the table ``name`` it is
    registered under in :data:`diverse.methods.catalog.METHODS` (and its own fields)."""

    name: str


@dataclass(frozen=True)
class LogPosterior:
    """The target every method trains on: ``log p(w | D) = Σ_n log p(y_n | x_n, w) + log p(w)``,
    per example (divided by N), estimated on a minibatch.

    Per member ``m`` (:meth:`loss`): ``−(1/B) Σ_b log p(y_b | x_b, w_m) + ‖w_m‖²/(2σ²N)``,
    ``(M,)``. The Gaussian prior N(0, σ² I) is on the member parameters; a shared
    trainable parameter (BatchEnsemble's slow weights) carries it once
    (:meth:`shared_prior`). ``prior_std = 0``: no prior term.

    Attributes:
        likelihood: maps outputs ``(M, B, K)`` and targets to per-member NLL ``(M, B)``.
        n_train: the training-set size N.
        prior_std: σ of the isotropic Gaussian weight prior, 0 for none.
    """

    likelihood: Likelihood
    n_train: int
    prior_std: float = 0.0

    def nll(self, outputs: Tensor, y: Tensor) -> Tensor:
        """Mean negative log likelihood of each member on the batch, ``(M,)``."""
        return self.likelihood.nll(outputs, y).mean(1)

    def prior(self, params: Params) -> Tensor:
        """``‖w_m‖²/(2σ²N)`` per member, ``(M,)`` (:func:`gaussian_prior_penalty`)."""
        return gaussian_prior_penalty(params, self.prior_std, self.n_train)

    def loss(self, outputs: Tensor, y: Tensor, params: Params) -> Tensor:
        """``−log p(w_m | batch)/N`` per member, ``(M,)``: NLL plus the prior term."""
        return self.nll(outputs, y) + self.prior(params)

    def shared_prior(self, shared: Params) -> Tensor:
        """``Σ ‖v‖²/(2σ²N)`` over the shared trainable tensors (a 0-dim tensor)."""
        if self.prior_std <= 0 or not shared:
            return torch.zeros(())
        return sum(v.square().sum() for v in shared.values()) / (2.0 * self.prior_std**2
                                                                  * self.n_train)


@dataclass
class Step:
    """Everything a method may use for one update.

    Attributes:
        ensemble: the members; ``ensemble.params`` are the stacked member parameters.
        x: inputs ``(B, ...)``; y: targets ``(B,)`` or ``(B, D)``.
        likelihood, n_train, prior_std: the log posterior's parts (:attr:`target`
            holds them as one :class:`LogPosterior`; objectives are per example).
        progress: ``step / total_steps`` in ``[0, 1)``, for annealing.
        index: the global step number (0-based), for warm-ups counted in steps.
        comm: the member sharding (:mod:`diverse.nets.distributed`): the ensemble
            holds this rank's members; interaction terms gather the others'
            embeddings with ``comm.gather``. Default: one process.
        state: the method's state ``{name: (M, ...)}`` (:attr:`MethodSpec.init_state`:
            SWAG moments, SGHMC momenta, HMC chains), updated in place by the method
            and handed back in :attr:`StepResult.state`.
    """

    ensemble: Ensemble
    x: Tensor
    y: Tensor
    likelihood: Likelihood
    n_train: int
    prior_std: float
    progress: float
    index: int = 0
    comm: Comm = SINGLE
    state: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.target = LogPosterior(self.likelihood, self.n_train, self.prior_std)


@dataclass
class StepResult:
    loss: Tensor  # (M,) per-member objective (detached)
    outputs: Tensor  # (M, B, K) outputs on the batch (detached)
    grads: Params | None  # {name: (M, *shape)} for the optimizer; None: the method moved θ
    # scalar diagnostics: floats or 0-dim tensors (read by the loop when it logs)
    logs: dict[str, float | Tensor] = field(default_factory=dict)
    # gradients of the shared trainable tensors {name: tensor}, when the method computed
    # them with its own backward (else train_step derives them from the target)
    shared_grads: Params | None = None
    # the method's state after the step (the Step's, updated in place)
    state: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingData:
    """What a method may precompute from the training data — never a whole run.

    Give ``inputs`` (and ``targets``) when the training set is a tensor, or
    ``batches`` (any iterable of ``(x, y)``, e.g. a ``DataLoader``) when it
    streams: one pass over it then provides what a method needs (FoRDE's PCA
    moments, the first ``outlier_pool`` inputs for HE-CKA's outliers, the
    full batch of HMC).

    Attributes:
        inputs: training inputs ``(N, ...)`` in the units the model sees, or None.
        targets: their targets ``(N,)`` / ``(N, D)``, or None.
        batches: an iterable of ``(x, y)`` batches, or None.
        task: ``"classification"`` or ``"regression"``.
        mean, std: the per-channel normalization already applied to the inputs
            (synthetic outliers are drawn in data units, then normalized alike);
            ``(0.0,)`` / ``(1.0,)`` when the inputs are not normalized.
        name: a name for messages.
    """

    inputs: Tensor | None = None
    targets: Tensor | None = None
    batches: Iterable[tuple[Tensor, Tensor]] | None = None
    task: str = "classification"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    name: str = "the training data"

    def head(self, count: int) -> Tensor:
        """The first ``count`` training inputs (fewer if the set is smaller), on CPU."""
        if self.inputs is not None:
            return self.inputs[:count]
        if self.batches is None:
            raise UserError(f"{self.name}: no training inputs were given (inputs or batches)")
        taken, total = [], 0
        for x, _y in self.batches:
            taken.append(x.detach().cpu())
            total += len(x)
            if total >= count:
                break
        return torch.cat(taken)[:count]

    def full(self) -> tuple[Tensor, Tensor]:
        """All training inputs and targets (a whole pass over ``batches`` if streamed)."""
        if self.inputs is not None and self.targets is not None:
            return self.inputs, self.targets
        if self.batches is None:
            raise UserError(f"{self.name}: no training data were given (inputs and targets, "
                            "or batches)")
        xs, ys = zip(*((x.detach().cpu(), y.detach().cpu()) for x, y in self.batches),
                     strict=True)
        return torch.cat(xs), torch.cat(ys)

    @classmethod
    def of(cls, dataset: Any) -> TrainingData:
        """The :class:`TrainingData` of a loaded :class:`diverse.data.datasets.Dataset`."""
        return cls(inputs=dataset.x_train, targets=dataset.y_train, task=dataset.task,
                   mean=tuple(dataset.mean), std=tuple(dataset.std), name=repr(dataset.name))


@dataclass(frozen=True)
class Finish:
    """What a Bayesian baseline's ``finalize`` needs to turn trained members into
    weight samples (:mod:`diverse.nets.samples`) — explicit, never a whole run.

    Attributes:
        skeleton: the plain member model (no method wrapper), in eval mode; only
            its structure is used.
        seed: the run's seed (sample draws are seeded from it).
        prior_std: σ of the training prior (Laplace's prior precision 1/σ²).
        data: the training data (Laplace fits its curvature on it), or None.
        state: the method's state after training (SWAG moments, kept samples).
    """

    skeleton: nn.Module
    seed: int
    prior_std: float = 0.0
    data: TrainingData | None = None
    state: dict[str, Tensor] = field(default_factory=dict)


def require_classification(name: str, data: TrainingData | None) -> None:
    """UserError when ``data`` is regression: ``name`` needs class labels."""
    if data is not None and data.task != "classification":
        raise UserError(f"[method] {name} needs classification data; {data.name} is {data.task}")


def gaussian_prior_penalty(params: Params, prior_std: float, n_train: int) -> Tensor:
    """Per-member ``‖w_m‖² / (2σ² N)`` — minus the log prior per example, ``(M,)``.

    Differentiable in ``params`` (gradient ``w_m / (σ² N)``), computed with one read
    of each leaf and a backward of one pass per leaf (:class:`_SquaredNorms`):
    autograd through ``square().sum()`` made four passes over the weights, 13 of
    a 25 ms deep-ensemble step on a 10-member 784-200-200-10 MLP.
    """
    if len({v.shape[0] for v in params.values()}) > 1:  # heterogeneous groups, in order
        groups: dict[str, Params] = {}
        for k, v in params.items():
            groups.setdefault(k.partition("/")[0], {})[k] = v
        return torch.cat([gaussian_prior_penalty(g, prior_std, n_train)
                          for g in groups.values()])
    if prior_std <= 0:
        first = next(iter(params.values()))
        return first.new_zeros(first.shape[0])
    return _SquaredNorms.apply(*params.values()) / (2.0 * prior_std**2 * n_train)


class _SquaredNorms(torch.autograd.Function):
    """``Σ_l ‖X_l[m]‖²`` per member ``(M,)`` of stacked leaves; backward ``2 g_m X_l[m]``."""

    @staticmethod
    def forward(ctx: Any, *leaves: Tensor) -> Tensor:
        ctx.save_for_backward(*leaves)
        return sum(torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).square()
                   for v in leaves)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        leaves = ctx.saved_tensors
        return tuple(v * (2.0 * grad).view(-1, *([1] * (v.ndim - 1))) for v in leaves)


def member_gradients(objective: Tensor, params: Params, *, retain_graph: bool = False) -> Params:
    """``{name: ∂objective/∂params[name]}``, each ``(M, *shape)``; zeros for an unused leaf.

    Members share no parameters, so for a sum of per-member objectives
    ``Σ_m L_m(w_m)`` row m of every gradient is member m's own ``∂L_m/∂w_m``:
    one backward gives every member's gradient, stacked.
    """
    names = list(params)
    grads = torch.autograd.grad(objective, [params[k] for k in names],
                                retain_graph=retain_graph, allow_unused=True)
    return {k: torch.zeros_like(params[k]) if g is None else g
            for k, g in zip(names, grads, strict=True)}


def set_grads(params: Params, grads: Params) -> None:
    """Hand a method's gradients to the stacked parameters (``p.grad``) for the optimizer,
    in the parameters' own (contiguous) layout.

    A gradient straight from a batched matmul's backward is often a transposed view;
    the optimizer's elementwise passes over it then read memory with a large stride
    (measured: Adam on a 10-member 784-200-200-10 MLP, 14.5 ms a step with transposed
    gradients vs 3.6 ms with contiguous ones; the copy costs 0.5 ms).
    """
    for name, p in params.items():
        g = grads[name]
        p.grad = g if g.is_contiguous() else g.contiguous()


def interaction_scales(cfg: Any, step: Step) -> tuple[float, float]:
    """The weights ``(a, c)`` of the driving term and the interaction term of a step.

    ``a = driving_scale · anneal(progress)`` (the annealing schedules of
    :mod:`diverse.math.annealing`); ``c = 1/N`` (``repulsion_scale = "n"``, the
    posterior's own scaling) or ``1/B`` (``"batch"``, the tempering of the FoRDE and
    HE-CKA code). ``cfg`` has ``driving_scale``, ``annealing``, ``annealing_cycles``
    and ``repulsion_scale`` (the particle and FoRDE configs).
    """
    a = cfg.driving_scale * anneal(cfg.annealing, step.progress, cycles=cfg.annealing_cycles)
    c = 1.0 / (step.n_train if cfg.repulsion_scale == "n" else len(step.x))
    return a, c


def interaction_logs(driving_norms: Tensor, repulsion_norms: Tensor) -> dict[str, Tensor]:
    """``driving_norm``, ``repulsion_norm`` (means over members of per-member norms ``(M,)``)
    and their ratio ``driving_over_repulsion`` — the diagnostics of every interacting
    method (a ratio above 10³ means the members train as a deep ensemble). 0-dim
    tensors on the members' device: the loop reads them when it logs, so computing
    them does not synchronize an accelerator."""
    dn, rn = driving_norms.mean(), repulsion_norms.mean()
    return {"driving_norm": dn, "repulsion_norm": rn,
            "driving_over_repulsion": dn / rn.clamp_min(1e-30)}


def member_diagnostics(outputs: Tensor, likelihood: Likelihood | None = None
                       ) -> dict[str, Tensor]:
    """The members' diversity on a batch, the one diagnostic every interacting method logs:
    ``disagreement``, the mean pairwise disagreement of the members' predicted classes
    (:func:`diverse.metrics.disagreement`) — comparable with ``diverse evaluate``'s
    figure. ``outputs``: logits ``(M, B, C)`` (all members'); ``{}`` for regression."""
    if likelihood is not None and likelihood.task != "classification":
        return {}
    from diverse.metrics import disagreement

    return {"disagreement": disagreement(outputs.detach().softmax(-1)).mean()}


def negative_log_posterior(step: Step, params: Params) -> tuple[Tensor, Tensor]:
    """Per-member −log p(w_m | batch)/N, ``(M,)``, and the outputs ``(M, B, K)``.

    ``−(1/B) Σ_b log p(y_b | x_b, w_m) + ‖w_m‖²/(2σ²N)``: the minibatch
    estimate of the negative log posterior divided by N.
    """
    outputs = step.ensemble.apply(params, step.x)
    return step.target.loss(outputs, step.y, params), outputs


@dataclass(frozen=True)
class DeepEnsembleConfig:
    """``[method] name = "de"``: independent members (no interaction).

    Fields:
        name: ``"de"``.
    """

    name: str = "de"


def deep_ensemble(cfg: DeepEnsembleConfig, data: TrainingData | None = None
                  ) -> Callable[[Step], StepResult]:
    """Deep ensemble (Lakshminarayanan et al. 2017) as MAP members.

    Each member descends its own negative log posterior; because members share
    no parameters, the gradient of the sum of member objectives is every
    member's own gradient, stacked.
    """

    def update(step: Step) -> StepResult:
        params, shared = step.ensemble.params, step.ensemble.shared_trainable
        loss, outputs = negative_log_posterior(step, params)
        if not shared:
            return StepResult(loss=loss.detach(), outputs=outputs.detach(),
                              grads=member_gradients(loss.sum(), params))
        # shared trainable tensors (BatchEnsemble's slow weights): the same backward
        objective = loss.sum() + step.target.shared_prior(shared).to(loss)
        grads = member_gradients(objective, {**params, **shared})
        return StepResult(loss=loss.detach(), outputs=outputs.detach(),
                          grads={k: grads[k] for k in params},
                          shared_grads={k: grads[k] for k in shared})

    return update


