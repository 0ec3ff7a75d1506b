"""SGHMC: stochastic gradient Hamiltonian Monte Carlo, with cyclical step sizes.

Chen, Fox & Guestrin 2014 ("Stochastic gradient Hamiltonian Monte Carlo"), in
the parametrization of Zhang et al. 2020 ("Cyclical stochastic gradient MCMC
for Bayesian deep learning", cSG-MCMC). With the per-example energy
U(θ)/N = −(1/N) log p(θ | D) estimated on the minibatch
(:func:`diverse.methods.base.negative_log_posterior`), each member runs

    v ← (1 − α) v − η_t ∇(U/N)(θ) + √(2 α η_t T / N) · ξ,   ξ ~ N(0, I)
    θ ← θ + v

(:func:`sghmc_step`): friction α, temperature T, step size η_t. That is SGHMC
on U with step ε² = η_t/N and no gradient-noise estimate (β̂ = 0); its
stationary distribution is ∝ exp(−U/T) as the step size goes to 0.

Step size (:func:`step_size`): constant η for ``cycles = 0``; for
``cycles = C ≥ 1`` the cosine cycles of Zhang et al., with r ∈ [0, 1) the
position inside the current cycle, η_t = η/2 · (cos(π r) + 1). Within each
cycle (the whole run when constant), the first ``burn_in`` fraction explores
(no noise, no samples, as Zhang et al.'s exploration stage; for a constant
step size this is the usual burn-in, whose samples would be discarded
anyway); afterwards noise is added and θ is kept (:func:`sample_due`): with
``thinning = 0`` (default) the k = K/C samples of a cycle are spread evenly over
its sampling stage (sample j at the first step with
r ≥ b + (1 − b)(j + ½)/k, b = ``burn_in``), so K samples per member come out
whatever the run length; with ``thinning ≥ 1`` every ``thinning``-th step is
kept in a ring holding the cycle's last k samples.

Samples: ``predict_samples`` = K per member, K/C slots per cycle. Momentum,
sample slots and counts are the method's explicit state (:func:`init_sghmc`),
stacked over members, checkpointed and resumed with the run.

The sampler is its own integrator: the update moves θ in place (under
``no_grad``) and hands the optimizer zero gradients, which leaves the weights
unchanged for sgd/adam/adamw without weight decay (checked: ``[train]
weight_decay`` must be 0; the prior is ``[train] prior_std``). ``[train] lr``
and ``schedule`` are not used; ``lr`` here is η.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diverse.errors import UserError
from diverse.methods.base import (
    Finish,
    Step,
    StepResult,
    TrainingData,
    member_gradients,
    negative_log_posterior,
)
from diverse.nets.ensemble import Ensemble, flatten_params, unflatten_params
from diverse.nets.samples import Samples, samples_from_draws
from diverse.validate import check_count, check_number

BUFFERS = ("sghmc_momentum", "sghmc_samples", "sghmc_count")


@dataclass(frozen=True)
class SGHMCConfig:
    """``[method] name = "sghmc"``.

    Fields:
        name: ``"sghmc"``.
        lr: η > 0, the step size on the per-example energy (default 0.05).
        friction: α in (0, 1], the momentum decay per step (default 0.1).
        temperature: T ≥ 0 (default 1.0; 0 is momentum SGD without noise).
        cycles: 0 for a constant step size, C ≥ 1 for C cosine cycles (default 0).
        burn_in: fraction in [0, 1) of each cycle (or of the run) without noise
            or samples (default 0.5).
        thinning: 0 (default) spreads each cycle's samples evenly over its sampling
            stage; n ≥ 1 keeps θ every n-th step (the cycle's last K/C are kept).
        predict_samples: samples kept per member, K ≥ 1, a multiple of ``max(C, 1)``
            (default 10).
    """

    name: str = "sghmc"
    lr: float = 0.05
    friction: float = 0.1
    temperature: float = 1.0
    cycles: int = 0
    burn_in: float = 0.5
    thinning: int = 0
    predict_samples: int = 10

    def __post_init__(self) -> None:
        check_number("[method] lr", self.lr, lambda v: v > 0, "a number > 0")
        check_number("[method] friction", self.friction, lambda v: 0 < v <= 1,
                     "a number in (0, 1]")
        check_number("[method] temperature", self.temperature, lambda v: v >= 0,
                     "a number >= 0")
        check_count("[method] cycles", self.cycles, 0)
        check_number("[method] burn_in", self.burn_in, lambda v: 0 <= v < 1, "a number in [0, 1)")
        check_count("[method] thinning", self.thinning, 0)
        check_count("[method] predict_samples", self.predict_samples)
        if self.predict_samples % max(self.cycles, 1):
            raise UserError(f"[method] predict_samples = {self.predict_samples}: must be a "
                            f"multiple of cycles = {self.cycles} (equal samples per cycle)")


def step_size(lr: float, progress: float, cycles: int) -> tuple[float, float, int]:
    """``(η_t, r, c)``: step size, position r ∈ [0, 1) in the cycle, cycle index c.

    ``cycles = 0``: ``(lr, progress, 0)``. Otherwise with C cycles,
    ``c = ⌊progress·C⌋``, ``r = progress·C − c``, ``η_t = lr/2 · (cos(π r) + 1)``.
    """
    if cycles == 0:
        return lr, progress, 0
    position = progress * cycles
    c = min(int(position), cycles - 1)
    r = position - c
    return lr / 2.0 * (math.cos(math.pi * r) + 1.0), r, c


def sample_due(r: float, index: int, kept: int, per_cycle: int, burn_in: float,
               thinning: int) -> int | None:
    """The slot (within the cycle) the current θ goes to, or ``None`` if no sample is due.

    ``r``: position in the cycle; ``index``: global step; ``kept``: samples this
    cycle kept so far; ``per_cycle``: k. See the module docstring for the rules.
    """
    if r < burn_in:
        return None
    if thinning > 0:
        return kept % per_cycle if index % thinning == 0 else None
    if kept < per_cycle and r >= burn_in + (1.0 - burn_in) * (kept + 0.5) / per_cycle:
        return kept
    return None


def sghmc_step(theta: Tensor, momentum: Tensor, grad: Tensor, lr: float, friction: float,
               noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """One SGHMC step on stacked flat weights; returns ``(θ', v')``.

    ``v' = (1 − α) v − η ∇ + noise``, ``θ' = θ + v'``, where ``noise`` is the
    already scaled √(2 α η T / N) ξ (``None``: no noise). All tensors ``(M, D)``.
    """
    v = (1.0 - friction) * momentum - lr * grad
    if noise is not None:
        v = v + noise
    return theta + v, v


def init_sghmc(cfg: SGHMCConfig, ensemble: Ensemble) -> dict[str, Tensor]:
    """``MethodSpec.init_state``: momentum, sample slots and per-cycle counts over the
    member parameters, stacked ``(M, ...)``.

    (``[train] weight_decay > 0`` is refused by :func:`diverse.methods.catalog.check_training`:
    a sampler takes no optimizer step.)
    """
    like = next(iter(ensemble.params.values()))
    m, d = like.shape[0], sum(v[0].numel() for v in ensemble.params.values())
    return {"sghmc_momentum": like.new_zeros(m, d),
            "sghmc_samples": like.new_zeros(m, cfg.predict_samples, d),
            "sghmc_count": torch.zeros(m, max(cfg.cycles, 1), dtype=torch.int64,
                                       device=like.device)}


def build_sghmc(cfg: SGHMCConfig, data: TrainingData | None = None) -> Callable[[Step], StepResult]:
    """The SGHMC update (module docstring): moves θ, updates its state (grads None)."""
    per_cycle = cfg.predict_samples // max(cfg.cycles, 1)

    def update(step: Step) -> StepResult:
        params, state = step.ensemble.params, step.state
        loss, outputs = negative_log_posterior(step, params)
        grads = member_gradients(loss.sum(), params)
        lr, r, c = step_size(cfg.lr, step.progress, cfg.cycles)
        sampling = r >= cfg.burn_in
        with torch.no_grad():
            momentum = state["sghmc_momentum"]
            noise = None
            if sampling and cfg.temperature > 0:
                std = math.sqrt(2.0 * cfg.friction * lr * cfg.temperature / step.n_train)
                noise = std * torch.randn_like(momentum)
            theta, v = sghmc_step(flatten_params(params), momentum,
                                  flatten_params(grads),
                                  lr, cfg.friction, noise)
            momentum.copy_(v)
            for k, value in unflatten_params(theta, params).items():
                params[k].copy_(value)
            count = state["sghmc_count"]
            slot = sample_due(r, step.index, int(count[0, c]), per_cycle, cfg.burn_in,
                              cfg.thinning)
            if slot is not None:
                state["sghmc_samples"][:, c * per_cycle + slot] = theta
                count[:, c] += 1
        return StepResult(
            loss=loss.detach(), outputs=outputs.detach(),
            grads=None,  # the sampler has moved θ: no optimizer step
            logs={"step_size": lr, "sampling": float(sampling)},
        )

    return update


def finalize_sghmc(cfg: SGHMCConfig, ensemble: Ensemble, finish: Finish) -> Samples:
    """The kept samples of every member, draw-major; UserError if a cycle kept too few."""
    per_cycle = cfg.predict_samples // max(cfg.cycles, 1)
    counts = finish.state["sghmc_count"][0].tolist()
    short = [(c, n) for c, n in enumerate(counts) if n < per_cycle]
    if short:
        c, n = short[0]
        raise UserError(
            f"sghmc kept {n} samples in cycle {c}, predict_samples = {cfg.predict_samples} "
            f"needs {per_cycle} per cycle: lower burn_in or thinning, or train longer "
            f"(thinning = 0 needs at least {per_cycle} sampling steps per cycle)"
        )
    kept = finish.state["sghmc_samples"]  # (M, K, D)
    draws = [unflatten_params(kept[:, k].clone(), ensemble.params) for k in range(kept.shape[1])]
    return samples_from_draws(finish.skeleton, draws, ensemble.member_buffers)
