"""Optimizers on stacked member tensors, and learning-rate schedules.

SGD (momentum, Nesterov), Adam and AdamW act elementwise, so running
``torch.optim`` on the stacked ``(M, ...)`` tensors is exactly M independent
optimizers, one per member, in one call. A method hands the optimizer the
gradient of its per-step objective (for a particle method: minus the update
direction φ), see :mod:`diverse.methods.base`.

Schedules are pure functions of the training progress ``t = step / total`` in
``[0, 1)`` returning the factor on the base learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from diverse.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "constant-linear")


def build_optimizer(
    params: Sequence[Tensor],
    name: str,
    lr: float,
    *,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """A torch optimizer over the stacked parameter tensors.

    ``weight_decay`` is L2 added to the gradient for SGD and Adam (a Gaussian
    prior with variance 1/(weight_decay·N) on the per-example loss), and the
    decoupled decay of Loshchilov & Hutter for AdamW.
    """
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise UserError(f"train optimizer = {name!r}: allowed {', '.join(OPTIMIZERS)}")


def schedule_factor(
    name: str, t: float, *, final: float = 0.01, hold: float = 0.5, end: float = 0.9
) -> float:
    """Learning-rate factor at progress ``t ∈ [0, 1]``.

    * ``constant``: 1.
    * ``cosine``: ``final + (1 − final)·½(1 + cos πt)``, from 1 to ``final``.
    * ``constant-linear`` (FoRDE, Trinh et al. 2024): 1 until ``hold`` (50%), then
      linear to ``final`` (0.01) at ``end`` (90%), then ``final``.
    """
    if name == "constant":
        return 1.0
    if name == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    if name == "constant-linear":
        if t <= hold:
            return 1.0
        if t >= end:
            return final
        return 1.0 + (final - 1.0) * (t - hold) / (end - hold)
    raise UserError(f"train schedule = {name!r}: allowed {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: Sequence[str]) -> dict[str, Tensor]:
    """The optimizer's per-parameter state as named tensors, for safetensors.

    Keys are ``"{param name}::{state key}"`` (e.g. ``"fc1.weight::exp_avg"``).
    """
    state = optimizer.state_dict()["state"]
    out = {}
    for index, name in enumerate(names):
        for key, value in state.get(index, {}).items():
            if isinstance(value, Tensor):
                out[f"{name}::{key}"] = value.detach().clone().contiguous()
            elif value is not None:
                out[f"{name}::{key}"] = torch.tensor(value)
    return out


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: Sequence[str], tensors: dict[str, Tensor]
) -> None:
    """Inverse of :func:`optimizer_tensors` (param groups keep their settings)."""
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    index_of = {name: i for i, name in enumerate(names)}
    for key, value in tensors.items():
        name, _, field = key.partition("::")
        if name not in index_of:
            raise UserError(f"optimizer state for unknown parameter {name!r} in checkpoint")
        state.setdefault(index_of[name], {})[field] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)
