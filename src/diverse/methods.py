"""Training methods: the per-step update on the stacked parameters.

A method is a function of a :class:`Step` (the ensemble, the batch, the
likelihood, the data-set size, the progress) that returns a
:class:`StepResult`: the per-member objective values ``(M,)``, the outputs
``(M, B, K)`` it computed on the batch, the gradient handed to the optimizer
for every stacked parameter, and scalar diagnostics. The optimizer then
descends that gradient. A particle method returns minus its update direction
φ; the deep ensemble returns the independent negative log-posterior gradients.

A builder takes the method's config dataclass and the loaded data set (for
what a method precomputes from the training data) and returns the update.
The name→builder table is :data:`diverse.catalog.METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diverse.distributed import SINGLE, Comm
from diverse.ensemble import Ensemble, Params
from diverse.likelihoods import Likelihood


@dataclass
class Step:
    """Everything a method may use for one update.

    Attributes:
        ensemble: the members; ``ensemble.params`` are the stacked leaves.
        x: inputs ``(B, ...)``; y: targets ``(B,)`` or ``(B, D)``.
        likelihood: maps outputs to per-member NLL ``(M, B)``.
        n_train: training-set size N (the likelihood is scaled by N in the
            log posterior; objectives here are divided by N, i.e. per example).
        prior_std: σ of the isotropic Gaussian weight prior, 0 for none.
        progress: ``step / total_steps`` in ``[0, 1)``, for annealing.
        index: the global step number (0-based), for warm-ups counted in steps.
        comm: the member sharding (:mod:`diverse.distributed`): the ensemble
            holds this rank's members; interaction terms gather the others'
            embeddings with ``comm.gather``. Default: one process.
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


@dataclass
class StepResult:
    loss: Tensor  # (M,) per-member objective (detached)
    outputs: Tensor  # (M, B, K) outputs on the batch (detached)
    grads: Params  # {name: (M, *shape)} gradient for the optimizer
    logs: dict[str, float] = field(default_factory=dict)


def gaussian_prior_penalty(params: Params, prior_std: float, n_train: int) -> Tensor:
    """Per-member ``‖w_m‖² / (2σ² N)`` — minus the log prior per example, ``(M,)``."""
    if prior_std <= 0:
        first = next(iter(params.values()))
        return first.new_zeros(first.shape[0])
    sq = sum(v.reshape(v.shape[0], -1).square().sum(1) for v in params.values())
    return sq / (2.0 * prior_std**2 * n_train)


def negative_log_posterior(step: Step, params: Params) -> tuple[Tensor, Tensor]:
    """Per-member −log p(w_m | batch)/N, ``(M,)``, and the outputs ``(M, B, K)``.

    ``−(1/B) Σ_b log p(y_b | x_b, w_m) + ‖w_m‖²/(2σ²N)``: the minibatch
    estimate of the negative log posterior divided by N.
    """
    outputs = step.ensemble.apply(params, step.x)
    nll = step.likelihood.nll(outputs, step.y).mean(dim=1)
    return nll + gaussian_prior_penalty(params, step.prior_std, step.n_train), outputs


@dataclass(frozen=True)
class DeepEnsembleConfig:
    """``[method] name = "de"``: independent members (no interaction).

    Fields:
        name: ``"de"``.
    """

    name: str = "de"


def deep_ensemble(cfg: DeepEnsembleConfig, dataset: Any = None) -> Callable[[Step], StepResult]:
    """Deep ensemble (Lakshminarayanan et al. 2017) as MAP members.

    Each member descends its own negative log posterior; because members share
    no parameters, the gradient of the sum of member objectives is every
    member's own gradient, stacked.
    """

    def update(step: Step) -> StepResult:
        params = step.ensemble.params
        loss, outputs = negative_log_posterior(step, params)
        names = list(params)
        grads = torch.autograd.grad(loss.sum(), [params[k] for k in names])
        return StepResult(
            loss=loss.detach(),
            outputs=outputs.detach(),
            grads=dict(zip(names, grads, strict=True)),
        )

    return update


