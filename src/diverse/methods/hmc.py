"""Full-batch Hamiltonian Monte Carlo: a gold-standard posterior for small networks.

Every member is an independent Markov chain on the exact log posterior of the
whole training set (Neal 2011, "MCMC using Hamiltonian dynamics"):

    U(θ) = −Σ_n log p(y_n | x_n, θ) + ‖θ‖² / (2σ²)      (σ = ``[train] prior_std`` > 0)

One training step is one HMC transition of every chain at once (the members'
forward and gradient are vectorized like an ensemble's): momentum
``p ~ N(0, M⁻¹⁻¹)`` with a diagonal mass matrix, ``L`` leapfrog steps of size
ε (jittered uniformly by ±10% per transition against periodic orbits), and a
Metropolis correction on the energy ``H = U(θ) + ½ pᵀ M⁻¹ p``. A transition
whose energy error exceeds ``max_energy_error`` (or is not finite) is a
*divergence* and is rejected.

Warm-up (the first ``warmup`` fraction of the run, no samples kept), as Stan's
(Hoffman & Gelman 2014, §3.2; Stan Reference Manual, "HMC algorithm
parameters"): ε is tuned per chain by dual averaging towards the acceptance
rate ``target_accept`` (γ = 0.05, t₀ = 10, κ = 0.75, μ = log 10ε); with
``adapt_mass``, the inverse mass M⁻¹ is set at 90% of warm-up to each chain's
regularized variance of θ over the window from 50% to 90% of warm-up
(``n/(n+5)·var + 10⁻³·5/(n+5)``) and the step size adaptation restarts. After
warm-up ε is the dual-averaged ε̄ and ``predict_samples`` = K states per chain
are kept, spread evenly over the sampling stage (as SGHMC's, :func:`diverse.
sghmc.sample_due`).

Departure from the reference NUTS runs (NumPyro, D'Angelo & Fortuin 2021's HMC): a fixed
trajectory length L instead of the No-U-Turn criterion — NUTS's doubling is
hard to vectorize over chains; with adapted ε and mass, fixed-L HMC targets the
same posterior exactly, at a mixing speed that depends on L (diagnosed by
split-R̂ and ESS on f(x) in the report, :mod:`diverse.math.mcmc`).

The sampler is its own integrator: it moves θ in place and hands the
optimizer zero gradients (as SGHMC; ``[train] weight_decay`` must be 0). Its
state — step sizes, dual-averaging state, inverse mass, the variance window,
the kept samples, acceptance and divergence counts — are the method's state for every
member, checkpointed and resumed with the run. The minibatch of a step is only
used for the progress figures; the transition uses all training data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diverse.errors import UserError
from diverse.methods.base import Finish, Step, StepResult, TrainingData
from diverse.nets.ensemble import Ensemble, flatten_params, unflatten_params
from diverse.nets.samples import Samples, samples_from_draws
from diverse.validate import check_count, check_number

# dual averaging constants (Hoffman & Gelman 2014, §3.2.1)
_GAMMA, _T0, _KAPPA = 0.05, 10.0, 0.75
#: The variance window of the mass adaptation, as fractions of the warm-up.
MASS_WINDOW = (0.5, 0.9)


@dataclass(frozen=True)
class HMCConfig:
    """``[method] name = "hmc"``: one full-batch HMC transition per training step.

    Fields:
        name: ``"hmc"``.
        step_size: initial leapfrog step size ε₀ > 0 (default 0.01; adapted in warm-up).
        leapfrog_steps: L ≥ 1 per transition (default 32).
        target_accept: the dual-averaging target acceptance in (0, 1) (default 0.8).
        warmup: fraction in (0, 1) of the run used for adaptation, no samples
            (default 0.5).
        adapt_mass: adapt a diagonal inverse mass matrix in warm-up (default true).
        max_energy_error: an energy error above this is a divergence (default 1000).
        predict_samples: K ≥ 1 states kept per chain (default 100).
    """

    name: str = "hmc"
    step_size: float = 0.01
    leapfrog_steps: int = 32
    target_accept: float = 0.8
    warmup: float = 0.5
    adapt_mass: bool = True
    max_energy_error: float = 1000.0
    predict_samples: int = 100

    def __post_init__(self) -> None:
        check_number("[method] step_size", self.step_size, lambda v: v > 0, "a number > 0")
        check_count("[method] leapfrog_steps", self.leapfrog_steps)
        check_number("[method] target_accept", self.target_accept, lambda v: 0 < v < 1,
                     "a number in (0, 1)")
        check_number("[method] warmup", self.warmup, lambda v: 0 < v < 1, "a number in (0, 1)")
        check_number("[method] max_energy_error", self.max_energy_error, lambda v: v > 0,
                     "a number > 0")
        check_count("[method] predict_samples", self.predict_samples)


def init_hmc(cfg: HMCConfig, ensemble: Ensemble) -> dict[str, Tensor]:
    """``MethodSpec.init_state``: every chain's adaptation, mass matrix and kept states
    over the member parameters, stacked ``(M, ...)``.

    (The training settings it needs — ``prior_std > 0``, no weight decay — are
    the method table's facts, checked by :func:`diverse.methods.catalog.check_training`.)
    """
    like = next(iter(ensemble.params.values()))
    m, d = like.shape[0], sum(v[0].numel() for v in ensemble.params.values())
    log_eps = math.log(cfg.step_size)
    scalars = {"hmc_log_eps": log_eps, "hmc_log_eps_bar": log_eps,
               "hmc_mu": math.log(10 * cfg.step_size), "hmc_hbar": 0.0, "hmc_da_t": 0.0,
               "hmc_window_n": 0.0, "hmc_accept": 0.0, "hmc_divergent": 0.0,
               "hmc_sampling": 0.0, "hmc_count": 0.0}
    state = {name: torch.full((m,), value, dtype=torch.float64, device=like.device)
             for name, value in scalars.items()}
    state["hmc_inv_mass"] = like.new_ones(m, d)
    state["hmc_window_mean"] = torch.zeros(m, d, dtype=torch.float64, device=like.device)
    state["hmc_window_m2"] = torch.zeros(m, d, dtype=torch.float64, device=like.device)
    state["hmc_samples"] = like.new_zeros(m, cfg.predict_samples, d)
    return state


def energy_and_grad(ens: Any, theta: Tensor, like: dict[str, Tensor], x: Tensor, y: Tensor,
                    likelihood: Any, prior_std: float) -> tuple[Tensor, Tensor]:
    """``U(θ_m)`` ``(M,)`` and ``∇U`` ``(M, D)`` on all data, every chain at once."""
    theta = theta.detach().requires_grad_(True)
    outputs = ens.apply(unflatten_params(theta, like), x)
    u = likelihood.nll(outputs, y).sum(-1) + theta.square().sum(-1) / (2 * prior_std**2)
    (grad,) = torch.autograd.grad(u.sum(), theta)
    return u.detach(), grad


def leapfrog(theta: Tensor, momentum: Tensor, grad: Tensor, eps: Tensor, inv_mass: Tensor,
             steps: int, grad_fn: Callable[[Tensor], tuple[Tensor, Tensor]]
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``L`` leapfrog steps from ``(θ, p)`` with per-chain ε ``(M, 1)``.

    Returns ``(θ', p', U(θ'), ∇U(θ'))``; ``grad`` is ∇U(θ).
    """
    p = momentum - 0.5 * eps * grad
    u = None
    for i in range(steps):
        theta = theta + eps * inv_mass * p
        u, grad = grad_fn(theta)
        if i < steps - 1:
            p = p - eps * grad
    p = p - 0.5 * eps * grad
    return theta, p, u, grad


def _dual_average(buffers: dict[str, Tensor], accept: Tensor, target: float) -> None:
    """One dual-averaging update of every chain's log ε, in place (Hoffman & Gelman Alg. 5)."""
    t = buffers["hmc_da_t"] + 1
    w = 1.0 / (t + _T0)
    hbar = (1 - w) * buffers["hmc_hbar"] + w * (target - accept)
    log_eps = buffers["hmc_mu"] - torch.sqrt(t) / _GAMMA * hbar
    eta = t.pow(-_KAPPA)
    buffers["hmc_log_eps_bar"].copy_(eta * log_eps + (1 - eta) * buffers["hmc_log_eps_bar"])
    buffers["hmc_log_eps"].copy_(log_eps)
    buffers["hmc_hbar"].copy_(hbar)
    buffers["hmc_da_t"].copy_(t)


def _restart_adaptation(buffers: dict[str, Tensor]) -> None:
    """After a new mass matrix: dual averaging starts again around 10ε (Stan)."""
    buffers["hmc_mu"].copy_(buffers["hmc_log_eps"] + math.log(10))
    buffers["hmc_hbar"].zero_()
    buffers["hmc_da_t"].zero_()
    buffers["hmc_log_eps_bar"].copy_(buffers["hmc_log_eps"])


def build_hmc(cfg: HMCConfig, data: TrainingData | None = None) -> Callable[[Step], StepResult]:
    """The HMC transition (module docstring) on the full training set of ``data``."""
    if data is None:
        raise UserError("hmc needs the training data (full-batch transitions)")
    x_full, y_full = data.full()

    def update(step: Step) -> StepResult:
        ens, params = step.ensemble, step.ensemble.params
        b = step.state
        x, y = x_full.to(ens.device), y_full.to(ens.device)
        like = {k: v.detach() for k, v in params.items()}

        def grad_fn(theta: Tensor) -> tuple[Tensor, Tensor]:
            return energy_and_grad(ens, theta, like, x, y, step.likelihood, step.prior_std)

        warming = step.progress < cfg.warmup
        theta0 = flatten_params(like)
        u0, g0 = grad_fn(theta0)
        inv_mass = b["hmc_inv_mass"]
        with torch.no_grad():
            p0 = torch.randn_like(theta0) / inv_mass.sqrt()
            log_eps = b["hmc_log_eps"] if warming else b["hmc_log_eps_bar"]
            jitter = 1.0 + 0.2 * (torch.rand(theta0.shape[0], device=theta0.device) - 0.5)
            eps = (log_eps.exp() * jitter.to(log_eps.dtype)).to(theta0.dtype)[:, None]
            h0 = u0 + 0.5 * (p0.square() * inv_mass).sum(-1)
        theta1, p1, u1, _ = leapfrog(theta0, p0, g0, eps, inv_mass, cfg.leapfrog_steps, grad_fn)
        with torch.no_grad():
            h1 = u1 + 0.5 * (p1.square() * inv_mass).sum(-1)
            error = (h1 - h0).to(torch.float64)
            divergent = ~torch.isfinite(error) | (error > cfg.max_energy_error)
            accept_prob = torch.where(divergent, torch.zeros_like(error),
                                      torch.exp(torch.clamp(-error, max=0.0)))
            accepted = torch.rand_like(accept_prob) < accept_prob
            theta = torch.where(accepted[:, None], theta1, theta0)
            for k, value in unflatten_params(theta, like).items():
                params[k].copy_(value)
            if warming:
                _dual_average(b, accept_prob, cfg.target_accept)
                window = (MASS_WINDOW[0] * cfg.warmup <= step.progress
                          < MASS_WINDOW[1] * cfg.warmup)
                if cfg.adapt_mass and window:  # Welford, per chain
                    n = b["hmc_window_n"] + 1
                    delta = theta.to(torch.float64) - b["hmc_window_mean"]
                    b["hmc_window_mean"].add_(delta / n[:, None])
                    b["hmc_window_m2"].add_(delta * (theta.to(torch.float64)
                                                     - b["hmc_window_mean"]))
                    b["hmc_window_n"].copy_(n)
                elif cfg.adapt_mass and step.progress >= MASS_WINDOW[1] * cfg.warmup and bool(
                        (b["hmc_window_n"] > 1).all()):
                    n = b["hmc_window_n"][:, None]
                    var = b["hmc_window_m2"] / (n - 1)
                    regularized = n / (n + 5) * var + 1e-3 * 5 / (n + 5)
                    inv_mass.copy_(regularized.to(inv_mass.dtype))
                    b["hmc_window_n"].zero_()  # used once
                    _restart_adaptation(b)
            else:
                b["hmc_sampling"].add_(1)
                b["hmc_accept"].add_(accept_prob)
                b["hmc_divergent"].add_(divergent.to(torch.float64))
                kept = int(b["hmc_count"][0])
                position = (step.progress - cfg.warmup) / (1 - cfg.warmup)  # in [0, 1)
                if kept < cfg.predict_samples and position >= kept / cfg.predict_samples:
                    b["hmc_samples"][:, kept] = theta
                    b["hmc_count"].add_(1)
            outputs = ens.apply(params, step.x)
        return StepResult(
            loss=(u0 / step.n_train).detach(), outputs=outputs.detach(),
            grads=None,  # the transition has moved θ: no optimizer step
            logs={"accept": float(accept_prob.mean()), "divergent": float(divergent.sum()),
                  "step_size": float(eps.mean()), "warmup": float(warming)})

    return update


def finalize_hmc(cfg: HMCConfig, ensemble: Ensemble, finish: Finish) -> Samples:
    """The kept states of every chain, draw-major; UserError if the run kept too few."""
    kept = int(finish.state["hmc_count"][0])
    if kept < cfg.predict_samples:
        raise UserError(f"hmc kept {kept} of predict_samples = {cfg.predict_samples} states per "
                        "chain: train for more steps or lower warmup (the sampling stage needs "
                        f"at least {cfg.predict_samples} transitions)")
    states = finish.state["hmc_samples"]  # (M, K, D)
    draws = [unflatten_params(states[:, k].clone(), ensemble.params)
             for k in range(states.shape[1])]
    return samples_from_draws(finish.skeleton, draws, ensemble.member_buffers)


def chain_summary(buffers: dict[str, Tensor]) -> dict[str, float]:
    """Sampling-stage figures of the chains: mean acceptance probability, the number
    of divergent transitions (all chains), the mean adapted step size and the number
    of sampling transitions per chain."""
    sampling = float(buffers["hmc_sampling"][0])
    return {"accept_rate": float(buffers["hmc_accept"].mean()) / max(sampling, 1.0),
            "divergences": int(buffers["hmc_divergent"].sum()),
            "step_size": float(buffers["hmc_log_eps_bar"].exp().mean()),
            "sampling_transitions": int(sampling)}
