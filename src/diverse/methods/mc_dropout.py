"""MC dropout (Gal & Ghahramani 2016, "Dropout as a Bayesian approximation").

Training is the deep-ensemble update (each member with its dropout layers, M = 1
for the single-mode form). :func:`to_mc_dropout` keeps every dropout layer
active in eval mode (:class:`MCDropout`), so held-out predictions during
training average ``predict_samples`` stochastic forwards per member.

Weight samples (``finalize``). Dropout on the input of a linear layer,
``W (z ⊙ h)/(1−p) + b``, is the same layer with weights ``W diag(z)/(1−p)``, so
one dropout draw is a weight sample: the columns of the layer after each
dropout multiplied by a Bernoulli(1−p) mask ``z`` over 1−p. The collection
holds ``predict_samples`` such masked copies of every member, and prediction
goes through them like every other method's samples. Departure from the usual
MC-dropout forward: one mask per draw is shared by all inputs of a batch (the
weight-space view of Gal & Ghahramani), where a stochastic forward draws a mask
per example. This needs every dropout layer to feed a ``Linear`` directly (true
for :class:`~diverse.nets.models.MLP` and :class:`~diverse.nets.models.LeNet5`; checked).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diverse.errors import UserError
from diverse.methods.base import (
    DeepEnsembleConfig,
    Finish,
    Step,
    StepResult,
    TrainingData,
    deep_ensemble,
)
from diverse.nets.ensemble import Ensemble
from diverse.nets.samples import Params, Samples, samples_from_draws
from diverse.validate import check_count

SAMPLE_STREAM = 7_001  # generator seed offset of the dropout-mask draws


@dataclass(frozen=True)
class MCDropoutConfig:
    """``[method] name = "mc-dropout"``.

    Fields:
        name: ``"mc-dropout"``.
        predict_samples: dropout draws per member at prediction, ≥ 1 (default 10).
    """

    name: str = "mc-dropout"
    predict_samples: int = 10

    def __post_init__(self) -> None:
        check_count("[method] predict_samples", self.predict_samples)


class MCDropout(nn.Dropout):
    """``nn.Dropout`` that also drops in eval mode: ``F.dropout(x, p, training=True)``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, True, self.inplace)


class DropoutTarget(NamedTuple):
    """A dropout layer and the linear layer whose input it masks."""

    dropout: str  # module name of the dropout
    p: float
    linear: str  # module name of the Linear right after it


def dropout_targets(module: nn.Module) -> list[DropoutTarget]:
    """Every dropout layer (p > 0) with the ``Linear`` it feeds, in module order.

    Raises UserError if there is none, or if a dropout is not followed directly
    by a ``Linear`` inside an ``nn.Sequential`` (its masks would then not be weight
    masks, see the module docstring).
    """
    names = {id(m): n for n, m in module.named_modules()}
    found: dict[str, DropoutTarget] = {}
    for parent in module.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.children())
        for i, child in enumerate(children):
            if isinstance(child, nn.Dropout) and child.p > 0:
                after = children[i + 1] if i + 1 < len(children) else None
                if not isinstance(after, nn.Linear):
                    raise UserError(
                        f"mc-dropout: dropout layer {names[id(child)]!r} does not feed a Linear "
                        f"layer directly; weight samples need dropout right before a Linear"
                    )
                found[names[id(child)]] = DropoutTarget(names[id(child)], child.p,
                                                        names[id(after)])
    every = [n for n, m in module.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if not every:
        raise UserError(f"mc-dropout: model {type(module).__name__} has no dropout layers; "
                        f"set [model] dropout > 0")
    missing = [n for n in every if n not in found]
    if missing:
        raise UserError(f"mc-dropout: dropout layer {missing[0]!r} is not inside a Sequential "
                        f"right before a Linear layer")
    return [found[n] for n in every]


def to_mc_dropout(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose dropout layers stay active in eval mode (names kept)."""
    dropout_targets(module)  # refuses models without (usable) dropout
    root = copy.deepcopy(module)
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, MCDropout(child.p, child.inplace))
    return root


def wrap_mc_dropout(cfg: MCDropoutConfig, module: nn.Module, members: int = 1,
                    seed: int = 0) -> nn.Module:
    """``MethodSpec.wrap_model``: :func:`to_mc_dropout`."""
    return to_mc_dropout(module)


def build_mc_dropout(cfg: MCDropoutConfig, data: TrainingData | None = None
                     ) -> Callable[[Step], StepResult]:
    """The training update: the deep-ensemble update (dropout is inside the members)."""
    return deep_ensemble(DeepEnsembleConfig())


def masked_weights(params: Params, targets: list[DropoutTarget], generator: torch.Generator
                   ) -> Params:
    """One dropout draw of every member as weights: ``{name: (M, *shape)}``.

    For each target, ``W_linear[m][:, j] ← W_linear[m][:, j] · z_mj / (1 − p)`` with
    ``z_mj ~ Bernoulli(1 − p)`` drawn from ``generator`` (CPU); other tensors unchanged.
    """
    out = {k: v.detach().clone() for k, v in params.items()}
    for t in targets:
        w = out[f"{t.linear}.weight"]  # (M, O, I)
        keep = torch.rand(w.shape[0], w.shape[-1], generator=generator) >= t.p
        scale = keep.to(w.dtype).to(w.device) / (1.0 - t.p)
        out[f"{t.linear}.weight"] = w * scale.unsqueeze(1)
    return out


def finalize_mc_dropout(cfg: MCDropoutConfig, ensemble: Ensemble, finish: Finish) -> Samples:
    """``predict_samples`` masked-weight draws per member (seeded by the run's seed)."""
    targets = dropout_targets(finish.skeleton)
    generator = torch.Generator().manual_seed(finish.seed * 1_000_003 + SAMPLE_STREAM)
    draws = [masked_weights(ensemble.params, targets, generator)
             for _ in range(cfg.predict_samples)]
    return samples_from_draws(finish.skeleton, draws, ensemble.member_buffers)
