"""What the model families share: activations, norms, input checks and initialization
helpers (:mod:`diverse.nets.models`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diverse.errors import UserError

# name -> (module factory, name passed to nn.init.calculate_gain / kaiming_normal_).
# GELU, SiLU, ELU and softplus are ReLU-like for initialisation purposes.
ACTIVATIONS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "relu": (nn.ReLU, "relu"),
    "gelu": (nn.GELU, "relu"),
    "tanh": (nn.Tanh, "tanh"),
    "silu": (nn.SiLU, "relu"),
    "elu": (nn.ELU, "relu"),
    "leaky_relu": (lambda: nn.LeakyReLU(0.01), "leaky_relu"),
    "softplus": (nn.Softplus, "relu"),
}

NORMS: tuple[str, ...] = ("batch", "group", "none")

_RESNET_DEPTHS: dict[str, int] = {"resnet20": 20, "resnet32": 32, "resnet56": 56}


# --------------------------------------------------------------------------- checks


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise UserError(
            f"unknown activation {activation!r}; allowed: {', '.join(sorted(ACTIVATIONS))}"
        )


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout!r}")


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")


def _check_width(width: int) -> None:
    if not isinstance(width, int) or width < 1:
        raise UserError(f"width must be a positive integer, got {width!r}")


def _group_count(groups: int, channels: int) -> int:
    """GroupNorm group count for ``channels``: ``min(groups, channels)``, which must divide."""
    g = min(groups, channels)
    if channels % g != 0:
        raise UserError(
            f"groups={groups} gives {g} GroupNorm groups, which does not divide {channels} "
            f"channels; choose groups dividing every stage width"
        )
    return g


def _check_groups(norm: str, groups: int, channels: tuple[int, ...]) -> None:
    if not isinstance(groups, int) or groups < 1:
        raise UserError(f"groups must be a positive integer, got {groups!r}")
    if norm == "group":
        for c in channels:
            _group_count(groups, c)


def _check_shape(input_shape: tuple[int, ...], num_outputs: int) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if len(shape) == 0 or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise UserError(f"input_shape must be a non-empty tuple of positive ints, got {shape!r}")
    if not isinstance(num_outputs, int) or num_outputs < 1:
        raise UserError(f"num_outputs must be a positive integer, got {num_outputs!r}")
    return shape


def _check_image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise UserError(
            f"model {name!r} needs an image input_shape (C, H, W), got {tuple(input_shape)!r}"
        )
    c, h, w = input_shape
    return c, h, w



# --------------------------------------------------------------------------- init helpers


def _kaiming_(module: nn.Module, nonlinearity: str) -> None:
    """Kaiming-normal (fan_in) weight for a Conv2d/Linear, zero bias."""
    a = 0.01 if nonlinearity == "leaky_relu" else 0.0
    nn.init.kaiming_normal_(module.weight, a=a, mode="fan_in", nonlinearity=nonlinearity)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _init_all(model: nn.Module, nonlinearity: str, output: nn.Module) -> None:
    """Kaiming init of every Conv2d/Linear in ``model``; ``output`` gets gain 1."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            _kaiming_(m, nonlinearity)
    _kaiming_(output, "linear")


def _make_norm(norm: str, channels: int, groups: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(_group_count(groups, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise UserError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes: ``(B, C, H, W) -> (B, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


