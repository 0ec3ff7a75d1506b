"""Mean-field variational inference: Bayes by backprop (Blundell et al. 2015).

Every member is a mean-field Gaussian network (:func:`diverse.nets.bayes.to_mean_field`:
``q(w) = Π N(μ_i, σ_i²)``, σ = softplus(ρ), forward by the local
reparameterization trick of Kingma et al. 2015). Member m minimizes the
negative ELBO per example,

    L_m = −(1/B) Σ_b log p(y_b | x_b, w̃_m)  +  λ · KL(q_m ‖ N(0, σ_p² I)) / N,

with one local-reparameterization sample w̃_m per example (the minibatch
estimate of the expected NLL), the closed-form KL
(:func:`diverse.nets.bayes.mean_field_kl`) and λ = ``kl_weight`` (1 for the ELBO).
The single-mode form is M = 1; the multi-mode form trains M members at once
(independent initializations, no interaction).

The step's ``[train] prior_std`` penalty is not applied: the KL to N(0, σ_p² I)
(``prior_std`` of this config) is the prior term; parameters that are not
mean-field (norm layers) get none.

Weight samples (``finalize``): ``predict_samples`` draws ``w = μ + σ ⊙ ε`` per
member, under the plain model's parameter names (``fc1.weight_mu`` → ``fc1.weight``;
deterministic parameters are copied), so VI posteriors compare with any other
method's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diverse.methods.base import Finish, Step, StepResult, TrainingData, member_gradients
from diverse.nets.bayes import mean_field_kl, mean_field_names, sigma_of, to_mean_field
from diverse.nets.ensemble import Ensemble
from diverse.nets.samples import Params, Samples, samples_from_draws
from diverse.validate import check_count, check_number

SAMPLE_STREAM = 7_002  # generator seed offset of the posterior draws


@dataclass(frozen=True)
class VIConfig:
    """``[method] name = "vi"``.

    Fields:
        name: ``"vi"``.
        prior_std: σ_p > 0 of the N(0, σ_p² I) prior (default 1.0).
        init_rho: initial ρ of every weight, σ = softplus(ρ) (default −5.0, σ ≈ 6.7e-3).
        kl_weight: λ ≥ 0 multiplying KL/N (default 1.0: the ELBO).
        predict_samples: weight draws per member at prediction, ≥ 1 (default 10).
    """

    name: str = "vi"
    prior_std: float = 1.0
    init_rho: float = -5.0
    kl_weight: float = 1.0
    predict_samples: int = 10

    def __post_init__(self) -> None:
        check_number("[method] prior_std", self.prior_std, lambda v: v > 0, "a number > 0")
        check_number("[method] init_rho", self.init_rho, lambda v: True, "a finite number")
        check_number("[method] kl_weight", self.kl_weight, lambda v: v >= 0, "a number >= 0")
        check_count("[method] predict_samples", self.predict_samples)


def wrap_vi(cfg: VIConfig, module: nn.Module, members: int = 1, seed: int = 0) -> nn.Module:
    """``MethodSpec.wrap_model``: the member made mean-field (``cfg``'s prior and ρ₀)."""
    return to_mean_field(module, prior_std=cfg.prior_std, init_rho=cfg.init_rho)


def negative_elbo(step: Step, params: Params, cfg: VIConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Per-member ``L_m`` ``(M,)`` (module docstring), its NLL part ``(M,)``, outputs ``(M, B, K)``.

    The forward samples (training mode) from torch's global RNG.
    """
    outputs = step.ensemble.apply(params, step.x)
    nll = step.likelihood.nll(outputs, step.y).mean(dim=1)
    kl = mean_field_kl(params, cfg.prior_std) / step.n_train
    return nll + cfg.kl_weight * kl, nll, outputs


def build_vi(cfg: VIConfig, data: TrainingData | None = None) -> Callable[[Step], StepResult]:
    """The Bayes-by-backprop update: ∂Σ_m L_m/∂(μ, ρ), every member's own gradient."""

    def update(step: Step) -> StepResult:
        params = step.ensemble.params
        loss, nll, outputs = negative_elbo(step, params, cfg)
        return StepResult(
            loss=loss.detach(), outputs=outputs.detach(),
            grads=member_gradients(loss.sum(), params),
            logs={"nll": float(nll.detach().mean()),
                  "kl": float((loss - nll).detach().mean())},
        )

    return update


def draw_weights(params: Params, generator: torch.Generator) -> Params:
    """One draw ``w = μ + softplus(ρ) ε`` of every member, plain names ``{name: (M, *shape)}``.

    ``<p>_mu``/``<p>_rho`` pairs become ``<p>``; other tensors are copied. ε is
    drawn on the CPU from ``generator``.
    """
    pairs = set(mean_field_names(params))
    out: Params = {}
    for k, v in params.items():
        if k.endswith("_mu") and k[:-3] in pairs:
            p = k[:-3]
            eps = torch.randn(v.shape, generator=generator).to(v.device, v.dtype)
            out[p] = (v + sigma_of(params[f"{p}_rho"]) * eps).detach()
        elif not (k.endswith("_rho") and k[:-4] in pairs):
            out[k] = v.detach().clone()
    return out


def finalize_vi(cfg: VIConfig, ensemble: Ensemble, finish: Finish) -> Samples:
    """``predict_samples`` posterior draws per member (seeded by the run's seed)."""
    generator = torch.Generator().manual_seed(finish.seed * 1_000_003 + SAMPLE_STREAM)
    draws = [draw_weights(ensemble.params, generator) for _ in range(cfg.predict_samples)]
    return samples_from_draws(finish.skeleton, draws, ensemble.member_buffers)
