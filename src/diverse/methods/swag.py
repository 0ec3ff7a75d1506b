"""SWAG: stochastic weight averaging Gaussian (Maddox et al. 2019, NeurIPS).

Training is the deep-ensemble (MAP) update. From training progress
``swa_start`` on, every ``swa_frequency``-th step collects the current weights
θ_i (the member parameters flattened, ``(D,)`` per member, before that step's
update) into running moments, the method's explicit state (:func:`init_swag`:
stacked ``(M, ...)``, handed in and out of every step, checkpointed and resumed
with the run):

    θ̄_n = (n θ̄_{n−1} + θ_n)/(n+1),   \\overline{θ²}_n = (n \\overline{θ²}_{n−1} + θ_n²)/(n+1),
    D[:, n mod K] = θ_n − θ̄_n        (the last K deviations, K = ``rank``).

Posterior draws (``finalize``, :func:`swag_sample`), with σ² = max(\\overline{θ²} − θ̄², ε):

    θ = θ̄ + √s · ( σ ⊙ z₁ / √2 + D z₂ / √(2(K−1)) ),   z₁ ~ N(0, I_D), z₂ ~ N(0, I_K),

i.e. covariance s·(diag(σ²)/2 + D Dᵀ/(2(K−1))) (Maddox et al., Eq. 3), with
s = ``scale`` and K the number of filled columns. ``rank = 0`` is SWAG-diagonal:
θ = θ̄ + √s · σ ⊙ z₁. The single-mode form is M = 1; multi-mode is one SWAG per
member ("MultiSWAG", Wilson & Izmailov 2020).

Choices where the paper is silent or differs: collection is counted in steps
(the paper collects once per epoch; ``swa_frequency`` = steps per epoch does
that) and uses the run's learning-rate schedule as configured (the paper uses a
constant SWA learning rate: ``[train] schedule = "constant"``); BatchNorm
statistics of a draw are its member's running statistics (the paper recomputes
them on the training set).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from diverse.errors import UserError
from diverse.methods.base import (
    DeepEnsembleConfig,
    Finish,
    Step,
    StepResult,
    TrainingData,
    deep_ensemble,
)
from diverse.nets.ensemble import Ensemble, flatten_params, unflatten_params
from diverse.nets.samples import Samples, samples_from_draws
from diverse.validate import check_count, check_number

BUFFERS = ("swag_mean", "swag_sq_mean", "swag_dev", "swag_count")
SAMPLE_STREAM = 7_003  # generator seed offset of the posterior draws


@dataclass(frozen=True)
class SWAGConfig:
    """``[method] name = "swag"``.

    Fields:
        name: ``"swag"``.
        swa_start: training progress in [0, 1) from which iterates are collected (default 0.5).
        swa_frequency: collect every this many optimizer steps, ≥ 1 (default 10).
        rank: K, columns of the deviation matrix: 0 (SWAG-diagonal) or ≥ 2 (default 20).
        scale: s > 0, factor on the covariance of the draws (default 1.0).
        var_clamp: ε > 0, floor of the diagonal variance (default 1e-30, as Maddox et al.).
        predict_samples: posterior draws per member at prediction, ≥ 1 (default 10).
    """

    name: str = "swag"
    swa_start: float = 0.5
    swa_frequency: int = 10
    rank: int = 20
    scale: float = 1.0
    var_clamp: float = 1e-30
    predict_samples: int = 10

    def __post_init__(self) -> None:
        check_number("[method] swa_start", self.swa_start, lambda v: 0 <= v < 1,
                     "a number in [0, 1)")
        check_count("[method] swa_frequency", self.swa_frequency)
        check_count("[method] rank", self.rank, 0)
        if self.rank == 1:
            raise UserError("[method] rank = 1: must be 0 (diagonal) or >= 2 (low rank)")
        check_number("[method] scale", self.scale, lambda v: v > 0, "a number > 0")
        check_number("[method] var_clamp", self.var_clamp, lambda v: v > 0, "a number > 0")
        check_count("[method] predict_samples", self.predict_samples)


class SWAGState(NamedTuple):
    """Stacked SWAG moments of M members over D flattened weights.

    Attributes:
        mean: θ̄ ``(M, D)``. sq_mean: \\overline{θ²} ``(M, D)``.
        dev: the deviation ring ``(M, K, D)`` (K = 0 for SWAG-diagonal).
        count: iterates collected so far, ``(M,)`` int64 (equal for all members).
    """

    mean: Tensor
    sq_mean: Tensor
    dev: Tensor
    count: Tensor


def swag_collect(state: SWAGState, theta: Tensor) -> SWAGState:
    """Add iterate ``theta (M, D)`` to the moments (module docstring); returns a new state."""
    n = int(state.count[0])
    mean = (n * state.mean + theta) / (n + 1)
    sq_mean = (n * state.sq_mean + theta.square()) / (n + 1)
    dev = state.dev.clone()
    if dev.shape[1] > 0:
        dev[:, n % dev.shape[1]] = theta - mean
    return SWAGState(mean, sq_mean, dev, state.count + 1)


def swag_sample(state: SWAGState, draws: int, generator: torch.Generator,
                scale: float = 1.0, var_clamp: float = 1e-30) -> Tensor:
    """``(draws, M, D)`` posterior draws (module docstring), noise from ``generator`` (CPU).

    Needs at least one collected iterate, and two for the low-rank part (K ≥ 2).
    """
    n = int(state.count[0])
    m, d = state.mean.shape
    rank = min(n, state.dev.shape[1])
    if n < 1:
        raise UserError("swag: no iterate was collected; lower [method] swa_start or "
                        "swa_frequency, or train longer")
    if state.dev.shape[1] > 0 and rank < 2:
        raise UserError(f"swag: only {n} iterate(s) collected, the low-rank part needs >= 2; "
                        f"lower swa_start or swa_frequency, train longer, or set rank = 0")
    sigma = (state.sq_mean - state.mean.square()).clamp_min(var_clamp).sqrt()
    z1 = torch.randn(draws, m, d, generator=generator, dtype=state.mean.dtype)
    z1 = z1.to(state.mean.device)
    if state.dev.shape[1] == 0:
        return state.mean + math.sqrt(scale) * sigma * z1
    z2 = torch.randn(draws, m, rank, generator=generator, dtype=state.mean.dtype)
    low_rank = torch.einsum("smk,mkd->smd", z2.to(state.mean.device), state.dev[:, :rank])
    spread = sigma * z1 / math.sqrt(2.0) + low_rank / math.sqrt(2.0 * (rank - 1))
    return state.mean + math.sqrt(scale) * spread


def swag_state(state: dict[str, Tensor]) -> SWAGState:
    """The :class:`SWAGState` view of the method's state dict."""
    return SWAGState(*(state[name] for name in BUFFERS))


def init_swag(cfg: SWAGConfig, ensemble: Ensemble) -> dict[str, Tensor]:
    """``MethodSpec.init_state``: zero moments over the member parameters, ``(M, ...)``."""
    like = next(iter(ensemble.params.values()))
    m, d = like.shape[0], sum(v[0].numel() for v in ensemble.params.values())
    return {"swag_mean": like.new_zeros(m, d), "swag_sq_mean": like.new_zeros(m, d),
            "swag_dev": like.new_zeros(m, cfg.rank, d),
            "swag_count": torch.zeros(m, dtype=torch.int64, device=like.device)}


def build_swag(cfg: SWAGConfig, data: TrainingData | None = None) -> Callable[[Step], StepResult]:
    """Deep-ensemble update that first collects θ into the SWAG moments (the state) when due."""
    inner = deep_ensemble(DeepEnsembleConfig())

    def update(step: Step) -> StepResult:
        state = step.state
        if step.progress >= cfg.swa_start and step.index % cfg.swa_frequency == 0:
            with torch.no_grad():
                new = swag_collect(swag_state(state),
                                   flatten_params(step.ensemble.params).detach())
                for name, value in zip(BUFFERS, new, strict=True):
                    state[name].copy_(value)
        result = inner(step)
        result.logs["swag_count"] = float(state["swag_count"][0])
        return result

    return update


def finalize_swag(cfg: SWAGConfig, ensemble: Ensemble, finish: Finish) -> Samples:
    """``predict_samples`` SWAG draws per member (seeded by the run's seed)."""
    generator = torch.Generator().manual_seed(finish.seed * 1_000_003 + SAMPLE_STREAM)
    flat = swag_sample(swag_state(finish.state), cfg.predict_samples, generator,
                       cfg.scale, cfg.var_clamp)
    draws = [unflatten_params(flat[i], ensemble.params) for i in range(flat.shape[0])]
    return samples_from_draws(finish.skeleton, draws, ensemble.member_buffers)
