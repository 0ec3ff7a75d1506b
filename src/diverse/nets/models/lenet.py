"""LeNet-5: config, module and builder (:mod:`diverse.nets.models`)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from diverse.errors import UserError
from diverse.nets.models._common import (
    ACTIVATIONS,
    _check_activation,
    _check_dropout,
    _check_image_shape,
    _check_shape,
    _init_all,
)


@dataclass(frozen=True)
class LeNetConfig:
    """LeNet-5 (LeCun et al. 1998) with max pooling.

    Attributes:
        name: registry name, ``"lenet5"``.
        activation: activation after every conv and hidden fc layer; default ``"relu"``
            (same choices as :class:`MLPConfig`).
        dropout: dropout probability before each of the three fc layers; default ``0.0``.
    """

    name: str = "lenet5"
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_activation(self.activation)
        _check_dropout(self.dropout)


# --------------------------------------------------------------------------- LeNet-5


class LeNet5(nn.Module):
    """LeNet-5 with max pooling (LeCun et al. 1998).

    Shapes: ``(B, C, H, W) -> (B, num_outputs)``. For ``28 x 28`` inputs conv1 pads by 2,
    so the classic 32 x 32 geometry (and a ``16*5*5 = 400`` flattened feature) is kept;
    other sizes use no padding and the flattened size follows from the input.

    Submodules:
        ``features``: ``conv1`` (C->6, 5x5), ``act1``, ``pool1`` (2x2 max), ``conv2``
        (6->16, 5x5), ``act2``, ``pool2``.
        ``classifier``: ``flatten``, [``drop1``], ``fc1`` (->120), ``act3``, [``drop2``],
        ``fc2`` (->84), ``act4``, [``drop3``], ``fc3`` (->num_outputs); the ``drop*``
        modules exist only when ``dropout > 0``.

    ``feature_layers = ("features.pool1", "features.pool2", "classifier.act3",
    "classifier.act4")``.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_outputs: int,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_activation(activation)
        _check_dropout(dropout)
        c, h, w = input_shape
        padding = 2 if (h, w) == (28, 28) else 0
        fh = ((h + 2 * padding - 4) // 2 - 4) // 2
        fw = ((w + 2 * padding - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise UserError(
                f"lenet5 needs H, W >= 16 (28 is padded to 32), got input_shape {input_shape!r}"
            )
        make_act, gain_name = ACTIVATIONS[activation]
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(c, 6, 5, padding=padding),
                act1=make_act(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(6, 16, 5),
                act2=make_act(),
                pool2=nn.MaxPool2d(2),
            )
        )
        fc3 = nn.Linear(84, num_outputs)
        cls: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        for k, (name, layer) in enumerate(
            [("fc1", nn.Linear(16 * fh * fw, 120)), ("fc2", nn.Linear(120, 84)), ("fc3", fc3)],
            start=1,
        ):
            if dropout > 0:
                cls[f"drop{k}"] = nn.Dropout(dropout)
            cls[name] = layer
            if k < 3:
                cls[f"act{k + 2}"] = make_act()
        self.classifier = nn.Sequential(cls)
        _init_all(self, gain_name, fc3)
        self.feature_layers: tuple[str, ...] = (
            "features.pool1",
            "features.pool2",
            "classifier.act3",
            "classifier.act4",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_lenet5(cfg: LeNetConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Builder for ``"lenet5"``: :class:`LeNet5`; needs ``(C, H, W)`` with ``H, W >= 16``."""
    shape = _check_image_shape(cfg.name, _check_shape(input_shape, num_outputs))
    return LeNet5(shape, num_outputs, cfg.activation, cfg.dropout)


