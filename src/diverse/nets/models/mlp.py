"""Linear models and MLPs: config, module and builder (:mod:`diverse.nets.models`)."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from diverse.errors import UserError
from diverse.nets.models._common import (
    ACTIVATIONS,
    _check_activation,
    _check_dropout,
    _check_shape,
    _init_all,
    _kaiming_,
)


@dataclass(frozen=True)
class LinearConfig:
    """Multinomial logistic regression: flatten, then one linear layer.

    Attributes:
        name: registry name, ``"linear"``.
    """

    name: str = "linear"


@dataclass(frozen=True)
class MLPConfig:
    """Fully connected network.

    Attributes:
        name: registry name, ``"mlp"``.
        hidden: widths of the hidden layers; default ``(200, 200)``. ``()`` is a linear model.
        activation: hidden activation, one of ``relu`` (default), ``gelu``, ``tanh``,
            ``silu``, ``elu``, ``leaky_relu`` (slope 0.01), ``softplus``.
        dropout: dropout probability after each hidden activation; default ``0.0`` (none).
    """

    name: str = "mlp"
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.hidden, list):  # TOML arrays arrive as lists
            object.__setattr__(self, "hidden", tuple(self.hidden))
        if not all(isinstance(h, int) and h >= 1 for h in self.hidden):
            raise UserError(f"hidden must be positive integers, got {self.hidden!r}")
        _check_activation(self.activation)
        _check_dropout(self.dropout)


# --------------------------------------------------------------------------- linear / MLP


class LinearModel(nn.Sequential):
    """Flatten, then ``Linear(prod(input_shape), num_outputs)``.

    Shapes: ``(B, *input_shape) -> (B, num_outputs)``.

    Submodules: ``flatten``, ``fc``. ``feature_layers = ("fc",)`` (the logits; there is
    no hidden layer).
    """

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int) -> None:
        fc = nn.Linear(math.prod(input_shape), num_outputs)
        super().__init__(OrderedDict(flatten=nn.Flatten(), fc=fc))
        _kaiming_(fc, "linear")
        self.feature_layers: tuple[str, ...] = ("fc",)


class MLP(nn.Sequential):
    """Flatten -> [Linear -> activation -> Dropout?] * K -> Linear.

    Shapes: ``(B, *input_shape) -> (B, num_outputs)``.

    Submodules, for hidden layer ``k = 1..K``: ``fc{k}``, ``act{k}`` and, when
    ``dropout > 0``, ``drop{k}``; the output layer is ``out``; the first module is
    ``flatten``. ``feature_layers = ("act1", ..., "actK")`` (hidden activations, before
    dropout).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_outputs: int,
        hidden: tuple[int, ...] = (200, 200),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        _check_activation(activation)
        _check_dropout(dropout)
        make_act, gain_name = ACTIVATIONS[activation]
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = math.prod(input_shape)
        for k, h in enumerate(hidden, start=1):
            layers[f"fc{k}"] = nn.Linear(width, h)
            layers[f"act{k}"] = make_act()
            if dropout > 0:
                layers[f"drop{k}"] = nn.Dropout(dropout)
            width = h
        out = nn.Linear(width, num_outputs)
        layers["out"] = out
        super().__init__(layers)
        _init_all(self, gain_name, out)
        self.feature_layers: tuple[str, ...] = tuple(f"act{k}" for k in range(1, len(hidden) + 1))


def build_linear(cfg: LinearConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Builder for ``"linear"``: :class:`LinearModel`."""
    shape = _check_shape(input_shape, num_outputs)
    return LinearModel(shape, num_outputs)


def build_mlp(cfg: MLPConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Builder for ``"mlp"``: :class:`MLP`."""
    shape = _check_shape(input_shape, num_outputs)
    return MLP(shape, num_outputs, tuple(cfg.hidden), cfg.activation, cfg.dropout)


