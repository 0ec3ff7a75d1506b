"""Model configs, builders and the name -> builder registry.

Every model is a plain :class:`torch.nn.Module` mapping a batch ``(B, *input_shape)``
to logits ``(B, num_outputs)``. An ensemble stacks ``M`` independently initialised
copies (``torch.func.stack_module_state``) and runs them with
``torch.func.functional_call`` under ``torch.func.vmap(..., randomness="different")``,
so the models here use only standard layers, no in-place ops on activations, no
``.item()`` and no data-dependent Python control flow.

Each model has stable submodule names (documented in its docstring) and a
``feature_layers: tuple[str, ...]`` attribute naming the modules whose outputs are
sensible default "features" (hidden activations, residual stages, pooled features).

Initialisation (all models): every ``Conv2d`` / ``Linear`` weight is Kaiming-normal
with ``mode="fan_in"`` (He et al. 2015) using the gain of the non-linearity that
follows it (ReLU gain for ReLU-like activations, ``tanh`` gain for tanh, leaky-ReLU
gain for leaky ReLU); the output layer uses gain 1 (``nonlinearity="linear"``), so
initial logits have roughly unit scale. Biases start at zero. Norm layers keep the
PyTorch default (weight 1, bias 0).

Use :func:`build_model` with one of the configs below, or :data:`MODELS` directly::

    model = build_model(ResNetConfig(name="resnet32", norm="none"), (3, 32, 32), 10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from diverse.errors import UserError
from diverse.nets.models._common import ACTIVATIONS, NORMS, GlobalAvgPool
from diverse.nets.models.custom import CustomConfig, build_custom, load_weights, weights_digest
from diverse.nets.models.lenet import LeNet5, LeNetConfig, build_lenet5
from diverse.nets.models.mlp import (
    MLP,
    LinearConfig,
    LinearModel,
    MLPConfig,
    build_linear,
    build_mlp,
)
from diverse.nets.models.resnet import (
    BasicBlock,
    CifarResNet,
    PadShortcut,
    PreActBlock,
    PreActResNet,
    PreActResNetConfig,
    ResNetConfig,
    build_preact_resnet,
    build_resnet,
)

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "MODELS",
    "LinearConfig",
    "MLPConfig",
    "LeNetConfig",
    "ResNetConfig",
    "PreActResNetConfig",
    "LinearModel",
    "MLP",
    "LeNet5",
    "BasicBlock",
    "CifarResNet",
    "PreActBlock",
    "PreActResNet",
    "build_linear",
    "build_mlp",
    "build_lenet5",
    "build_resnet",
    "build_preact_resnet",
    "build_model",
    "CustomConfig",
    "build_custom",
    "load_weights",
    "weights_digest",
    "GlobalAvgPool",
    "PadShortcut",
]


Builder = Callable[[Any, tuple[int, ...], int], nn.Module]

#: registry name -> (config class, builder(cfg, input_shape, num_outputs)).
MODELS: dict[str, tuple[type, Builder]] = {
    "linear": (LinearConfig, build_linear),
    "mlp": (MLPConfig, build_mlp),
    "lenet5": (LeNetConfig, build_lenet5),
    "resnet20": (ResNetConfig, build_resnet),
    "resnet32": (ResNetConfig, build_resnet),
    "resnet56": (ResNetConfig, build_resnet),
    "preact-resnet18": (PreActResNetConfig, build_preact_resnet),
    "custom": (CustomConfig, build_custom),
}


def build_model(cfg: Any, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Build the model named by ``cfg.name`` for inputs ``(B, *input_shape)``.

    Returns a freshly (randomly) initialised module mapping ``(B, *input_shape)`` to
    ``(B, num_outputs)``. Raises :class:`UserError` for an unknown name, a config of the
    wrong class, or an input shape the model cannot take.
    """
    name = getattr(cfg, "name", None)
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    cfg_cls, builder = MODELS[name]
    if not isinstance(cfg, cfg_cls):
        raise UserError(f"model {name!r} needs a {cfg_cls.__name__}, got {type(cfg).__name__}")
    return builder(cfg, tuple(input_shape), num_outputs)
