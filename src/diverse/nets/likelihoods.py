"""Likelihoods: negative log-likelihoods of member outputs and predictive forms.

A likelihood maps the raw member outputs ``(M, B, K)`` and targets to the
per-member, per-example negative log-likelihood ``(M, B)``, and turns outputs
into what the metrics consume: class probabilities ``(M, B, C)`` or Gaussian
means and standard deviations ``(M, B, D)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diverse.errors import UserError

LIKELIHOODS = ("categorical", "gaussian")


@dataclass(frozen=True)
class LikelihoodConfig:
    """The ``[likelihood]`` section.

    Fields:
        name: ``"categorical"`` (classification) or ``"gaussian"`` (regression).
            Default ``"categorical"``; a regression data set switches it to
            gaussian when left at the default.
        noise_std: fixed observation noise σ of the Gaussian likelihood
            (default 0.25, the 1D toy's true noise). Ignored when learned.
        learn_noise: Gaussian only: the model predicts a per-input σ through a
            second output per target (heteroscedastic; σ = softplus(s) + 1e-4).
            Default ``False``.
    """

    name: str = "categorical"
    noise_std: float = 0.25
    learn_noise: bool = False


class Categorical:
    """Softmax-categorical likelihood: −log p(y|x) = −log softmax(f(x))_y."""

    task = "classification"

    def outputs_per_target(self, num_targets: int) -> int:
        return num_targets

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``(M, B, C)`` logits, ``(B,)`` labels → ``(M, B)`` NLL."""
        logp = F.log_softmax(outputs, dim=-1)
        index = targets.expand(outputs.shape[0], -1).unsqueeze(-1)
        return -logp.gather(-1, index).squeeze(-1)

    def predict(self, outputs: Tensor) -> dict[str, Tensor]:
        """``(M, B, C)`` logits → ``{"probs": (M, B, C), "logits": (M, B, C)}``.

        The logits are kept for the scores that need them (energy, max logit,
        calibrate-then-pool temperature scaling: :mod:`diverse.math.confidence`,
        :mod:`diverse.math.calibration`).
        """
        return {"probs": outputs.softmax(-1), "logits": outputs}

    def correct(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-member correctness ``(M, B)`` (float) for progress display."""
        return (outputs.argmax(-1) == targets).float()


class Gaussian:
    """Gaussian likelihood with fixed σ or a learned (heteroscedastic) σ(x).

    −log N(y; μ, σ²) = ½ log(2π σ²) + (y − μ)² / (2σ²), summed over the D
    target dimensions. With ``learn_noise`` the model outputs ``2D`` values
    per input: μ and a raw scale s with σ = softplus(s) + 1e-4.
    """

    task = "regression"

    def __init__(self, noise_std: float, learn_noise: bool) -> None:
        if not learn_noise and not noise_std > 0:
            raise UserError(f"likelihood noise_std = {noise_std}: must be > 0")
        self.noise_std = noise_std
        self.learn_noise = learn_noise

    def outputs_per_target(self, num_targets: int) -> int:
        return 2 * num_targets if self.learn_noise else num_targets

    def mean_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        if self.learn_noise:
            mean, raw = outputs.chunk(2, dim=-1)
            return mean, F.softplus(raw) + 1e-4
        return outputs, torch.full_like(outputs, self.noise_std)

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``(M, B, K)`` outputs, ``(B, D)`` targets → ``(M, B)`` NLL."""
        mean, std = self.mean_std(outputs)
        z = (targets - mean) / std
        return (0.5 * z.square() + std.log() + 0.5 * math.log(2 * math.pi)).sum(-1)

    def predict(self, outputs: Tensor) -> dict[str, Tensor]:
        """→ ``{"means": (M, B, D), "stds": (M, B, D)}`` (σ of the noise)."""
        mean, std = self.mean_std(outputs)
        return {"means": mean, "stds": std}

    def correct(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Negative squared error ``(M, B)``, the regression progress figure."""
        mean, _ = self.mean_std(outputs)
        return -(mean - targets).square().mean(-1)


Likelihood = Categorical | Gaussian


def likelihood_config(likelihood: Likelihood) -> LikelihoodConfig:
    """The config of a built likelihood (saved with a run, rebuilt by :func:`build_likelihood`)."""
    if isinstance(likelihood, Gaussian):
        return LikelihoodConfig(name="gaussian", noise_std=likelihood.noise_std,
                                learn_noise=likelihood.learn_noise)
    return LikelihoodConfig(name="categorical")


def as_likelihood(likelihood: Likelihood | LikelihoodConfig | str) -> Likelihood:
    """A likelihood from its name (``"categorical"``, ``"gaussian"``), a config, or as built."""
    if isinstance(likelihood, str):
        return build_likelihood(LikelihoodConfig(name=likelihood))
    if isinstance(likelihood, LikelihoodConfig):
        return build_likelihood(likelihood)
    return likelihood


def build_likelihood(cfg: LikelihoodConfig) -> Likelihood:
    """The likelihood named by ``cfg.name``."""
    if cfg.name == "categorical":
        return Categorical()
    if cfg.name == "gaussian":
        return Gaussian(cfg.noise_std, cfg.learn_noise)
    raise UserError(f"likelihood name = {cfg.name!r}: allowed {', '.join(LIKELIHOODS)}")
