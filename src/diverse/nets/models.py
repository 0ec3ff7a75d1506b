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

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diverse.errors import UserError

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
]

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


# --------------------------------------------------------------------------- configs


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


@dataclass(frozen=True)
class ResNetConfig:
    """CIFAR ResNet-20/32/56 (He et al. 2016, option-A shortcuts).

    Attributes:
        name: registry name and depth: ``"resnet20"`` (default), ``"resnet32"``, ``"resnet56"``.
        norm: ``"batch"`` (BatchNorm2d, default), ``"group"`` (GroupNorm) or ``"none"``
            (identity; convs get biases and each residual branch's last conv starts at zero).
        groups: GroupNorm groups; each norm layer uses ``min(groups, channels)``, which must
            divide its channel count. Default ``8``. Ignored unless ``norm="group"``.
        width: channels of the first stage; stages have ``width, 2*width, 4*width``.
            Default ``16``.
    """

    name: str = "resnet20"
    norm: str = "batch"
    groups: int = 8
    width: int = 16

    def __post_init__(self) -> None:
        if self.name not in _RESNET_DEPTHS:
            raise UserError(
                f"unknown CIFAR ResNet {self.name!r}; allowed: {', '.join(_RESNET_DEPTHS)}"
            )
        _check_norm(self.norm)
        _check_width(self.width)
        _check_groups(self.norm, self.groups, (self.width, 2 * self.width, 4 * self.width))


@dataclass(frozen=True)
class PreActResNetConfig:
    """Pre-activation ResNet-18 (He et al. 2016, "Identity Mappings") with a CIFAR stem.

    Attributes:
        name: registry name, ``"preact-resnet18"``.
        norm: ``"batch"`` (default), ``"group"`` or ``"none"``, as in :class:`ResNetConfig`.
        groups: GroupNorm groups, ``min(groups, channels)`` per layer; default ``8``.
            Ignored unless ``norm="group"``.
        width: channels of the first stage; stages have ``width * (1, 2, 4, 8)``.
            Default ``64``.
    """

    name: str = "preact-resnet18"
    norm: str = "batch"
    groups: int = 8
    width: int = 64

    def __post_init__(self) -> None:
        _check_norm(self.norm)
        _check_width(self.width)
        w = self.width
        _check_groups(self.norm, self.groups, (w, 2 * w, 4 * w, 8 * w))


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


# --------------------------------------------------------------------------- CIFAR ResNet


class PadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2016, CIFAR): subsample by ``stride``, zero-pad channels.

    ``(B, C, H, W) -> (B, C + extra, ceil(H/stride), ceil(W/stride))``; parameter-free.
    The new channels are appended after the existing ones.
    """

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return F.pad(x[..., ::s, ::s], (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Post-activation basic block: ``act2(shortcut(x) + norm2(conv2(act1(norm1(conv1(x))))))``.

    Submodules: ``conv1`` (3x3, stride), ``norm1``, ``act1``, ``conv2`` (3x3), ``norm2``,
    ``shortcut`` (identity or :class:`PadShortcut`), ``act2``. ``norm*`` are
    ``nn.Identity`` when ``norm="none"``; then the convs carry biases.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _make_norm(norm, planes, groups)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=bias)
        self.norm2 = _make_norm(norm, planes, groups)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(planes - in_planes, stride)
        else:
            self.shortcut = nn.Identity()
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) (He et al. 2016, Sec. 4.2): 3 stages of ``n`` basic blocks.

    Shapes: ``(B, C, H, W) -> (B, num_outputs)``; any ``H, W`` (e.g. 32x32 or 28x28),
    global average pooling before the classifier.

    Stages have ``width, 2*width, 4*width`` channels (16/32/64 by default) and strides
    1, 2, 2. Shortcuts are option A (parameter-free subsample + zero-pad, as in the
    paper's CIFAR experiments), so ResNet-20 with BatchNorm has 269,722 parameters for
    10 classes (the paper's "0.27M").

    ``norm="none"``: norms are identities, convs have biases, and the last conv of every
    residual branch (``conv2``) is initialised to zero (Fixup, Zhang et al. 2019; SkipInit,
    De & Smith 2020), so each block starts as the identity and the network trains without
    normalisation. Those weights are then equal across ensemble members at
    initialisation; members still differ in every other layer.

    Submodules: ``conv1`` (3x3 stem), ``norm1``, ``act1``, ``layer1``, ``layer2``,
    ``layer3`` (``nn.Sequential`` of :class:`BasicBlock`, so blocks are ``layer2.0``,
    ``layer2.1``, ...), ``pool`` (:class:`GlobalAvgPool`, output ``(B, 4*width)``), ``fc``.

    ``feature_layers = ("layer1", "layer2", "layer3", "pool")``.
    """

    def __init__(
        self,
        depth: int,
        in_channels: int,
        num_outputs: int,
        norm: str = "batch",
        groups: int = 8,
        width: int = 16,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise UserError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth!r}")
        _check_norm(norm)
        _check_width(width)
        _check_groups(norm, groups, (width, 2 * width, 4 * width))
        n = (depth - 2) // 6
        self.depth = depth
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=bias)
        self.norm1 = _make_norm(norm, width, groups)
        self.act1 = nn.ReLU()
        in_planes = width
        for i, (planes, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2)], start=1):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if j == 0 else 1, norm, groups))
                in_planes = planes
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(in_planes, num_outputs)
        _init_all(self, "relu", self.fc)
        if norm == "none":
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.conv2.weight)
        self.feature_layers: tuple[str, ...] = ("layer1", "layer2", "layer3", "pool")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))


# --------------------------------------------------------------------------- PreAct ResNet


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings", Fig. 4e).

    ``h = act1(norm1(x)); out = conv2(act2(norm2(conv1(h)))) + shortcut(x or h)``.
    With a change of stride or width the shortcut is a 1x1 conv applied to ``h`` (the
    pre-activated input, as in the authors' code); otherwise it is the identity on ``x``.

    Submodules: ``norm1``, ``act1``, ``conv1`` (3x3, stride), ``norm2``, ``act2``,
    ``conv2`` (3x3), and ``shortcut`` (``nn.Conv2d`` 1x1) only when projecting.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        bias = norm == "none"
        self.norm1 = _make_norm(norm, in_planes, groups)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.norm2 = _make_norm(norm, planes, groups)
        self.act2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=bias)
        self.projects = stride != 1 or in_planes != planes
        if self.projects:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.norm1(x))
        skip = self.shortcut(h) if self.projects else x
        out = self.conv2(self.act2(self.norm2(self.conv1(h))))
        return out + skip


class PreActResNet(nn.Module):
    """Pre-activation ResNet (He et al. 2016, "Identity Mappings") with a CIFAR stem.

    Shapes: ``(B, C, H, W) -> (B, num_outputs)``; any ``H, W``.

    Stem: one 3x3 conv (stride 1, no pooling). Four stages of :class:`PreActBlock` with
    ``width * (1, 2, 4, 8)`` channels (64/128/256/512 by default), strides 1, 2, 2, 2.
    Because blocks end with an addition, a final norm + ReLU precedes global average
    pooling, as in the paper (the popular kuangliu/pytorch-cifar version omits it).

    ``norm="none"``: identity norms, conv biases, and ``conv2`` of every block zero-
    initialised so each residual branch starts at zero (see :class:`CifarResNet`).

    Submodules: ``conv1``, ``layer1`` .. ``layer4`` (blocks ``layer{i}.{j}``), ``norm``,
    ``act``, ``pool`` (output ``(B, 8*width)``), ``fc``.

    ``feature_layers = ("layer1", "layer2", "layer3", "layer4", "pool")``.
    """

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        norm: str = "batch",
        groups: int = 8,
        width: int = 64,
    ) -> None:
        super().__init__()
        _check_norm(norm)
        _check_width(width)
        widths = tuple(width * 2**i for i in range(len(blocks)))
        _check_groups(norm, groups, widths)
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=bias)
        in_planes = width
        for i, (planes, n) in enumerate(zip(widths, blocks, strict=True), start=1):
            stride = 1 if i == 1 else 2
            layers = []
            for j in range(n):
                layers.append(PreActBlock(in_planes, planes, stride if j == 0 else 1, norm, groups))
                in_planes = planes
            self.add_module(f"layer{i}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.norm = _make_norm(norm, in_planes, groups)
        self.act = nn.ReLU()
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(in_planes, num_outputs)
        _init_all(self, "relu", self.fc)
        if norm == "none":
            for m in self.modules():
                if isinstance(m, PreActBlock):
                    nn.init.zeros_(m.conv2.weight)
        self.feature_layers: tuple[str, ...] = tuple(
            f"layer{i}" for i in range(1, len(blocks) + 1)
        ) + ("pool",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.pool(self.act(self.norm(x))))


# --------------------------------------------------------------------------- builders


def build_linear(cfg: LinearConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Builder for ``"linear"``: :class:`LinearModel`."""
    shape = _check_shape(input_shape, num_outputs)
    return LinearModel(shape, num_outputs)


def build_mlp(cfg: MLPConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Builder for ``"mlp"``: :class:`MLP`."""
    shape = _check_shape(input_shape, num_outputs)
    return MLP(shape, num_outputs, tuple(cfg.hidden), cfg.activation, cfg.dropout)


def build_lenet5(cfg: LeNetConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Builder for ``"lenet5"``: :class:`LeNet5`; needs ``(C, H, W)`` with ``H, W >= 16``."""
    shape = _check_image_shape(cfg.name, _check_shape(input_shape, num_outputs))
    return LeNet5(shape, num_outputs, cfg.activation, cfg.dropout)


def build_resnet(cfg: ResNetConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Builder for ``"resnet20"``, ``"resnet32"``, ``"resnet56"``: :class:`CifarResNet`."""
    c, _, _ = _check_image_shape(cfg.name, _check_shape(input_shape, num_outputs))
    if cfg.name not in _RESNET_DEPTHS:
        raise UserError(f"unknown CIFAR ResNet {cfg.name!r}; allowed: {', '.join(_RESNET_DEPTHS)}")
    return CifarResNet(_RESNET_DEPTHS[cfg.name], c, num_outputs, cfg.norm, cfg.groups, cfg.width)


def build_preact_resnet(
    cfg: PreActResNetConfig, input_shape: tuple[int, ...], num_outputs: int
) -> nn.Module:
    """Builder for ``"preact-resnet18"``: :class:`PreActResNet` with blocks ``(2, 2, 2, 2)``."""
    c, _, _ = _check_image_shape(cfg.name, _check_shape(input_shape, num_outputs))
    return PreActResNet(c, num_outputs, (2, 2, 2, 2), cfg.norm, cfg.groups, cfg.width)


@dataclass(frozen=True)
class CustomConfig:
    """Your own ``nn.Module``: ``[model] name = "custom"``.

    Attributes:
        name: ``"custom"``.
        factory: ``"module:function"``; ``function(input_shape, num_outputs)`` returns a
            freshly initialized module mapping ``(B, *input_shape)`` to
            ``(B, num_outputs)``. It is called once per member under the member's seed.
            Give it a ``feature_layers`` attribute (module names) for the
            feature-space methods.
        search_path: the folder the module is imported from first (default: the config
            file's folder, filled in by :func:`diverse.app.config.load_config`; then the
            Python path). The module runs with your rights, like any script you run.
        weights: a safetensors file of pretrained weights loaded into the module after
            it is built (path relative to the config file); keys it lacks keep the
            module's initialization (a new head), a key the module lacks or a shape
            that differs is refused.
        weights_sha256: the file's SHA-256, filled in when the run starts and recorded
            in its config: a resume or a load refuses a file that changed.
    """

    name: str = "custom"
    factory: str = ""
    search_path: str = ""
    weights: str = ""
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        module, _, function = self.factory.partition(":")
        if not (module and function and all(p.isidentifier() for p in module.split("."))
                and function.isidentifier()):
            raise UserError(f"[model] factory = {self.factory!r}: expected \"module:function\""
                            ", e.g. \"my_models:make_cnn\" (my_models.py next to the config)")


def build_custom(cfg: CustomConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Builder for ``"custom"``: import ``cfg.factory`` and call it; the module's output
    shape is checked on a probe batch of two zeros in eval mode."""
    import importlib
    import sys

    module_name, _, function_name = cfg.factory.partition(":")
    added = bool(cfg.search_path) and cfg.search_path not in sys.path
    if added:
        sys.path.insert(0, cfg.search_path)
    try:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            where = f" (searched {cfg.search_path!r} first)" if cfg.search_path else ""
            raise UserError(f"[model] factory = {cfg.factory!r}: cannot import "
                            f"{module_name!r}{where}: {err}") from err
    finally:
        if added:
            sys.path.remove(cfg.search_path)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"[model] factory = {cfg.factory!r}: {module_name!r} has no function "
                        f"{function_name!r}")
    net = function(tuple(input_shape), num_outputs)
    if not isinstance(net, nn.Module):
        raise UserError(f"[model] factory = {cfg.factory!r} returned {type(net).__name__}, not "
                        "a torch.nn.Module")
    if cfg.weights:
        load_weights(net, cfg.weights, cfg.weights_sha256)
    was_training = net.training
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        out = net.eval()(torch.zeros(2, *input_shape))
    net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_outputs):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"[model] factory = {cfg.factory!r}: the module maps (2, "
                        f"{', '.join(map(str, input_shape))}) to {shape}; expected (2, "
                        f"{num_outputs}) (one output per class or target)")
    return net


def weights_digest(path: str) -> str:
    """SHA-256 of a weights file; UserError naming it when it cannot be read."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise UserError(f"[model] weights = {path!r}: cannot read it ({err.strerror})") from None
    return digest.hexdigest()


def load_weights(net: nn.Module, path: str, sha256: str = "") -> None:
    """Load a safetensors file into ``net`` (no pickle): checked against ``sha256`` when
    given; keys the file lacks keep ``net``'s values, unknown keys or shapes are refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if sha256 and weights_digest(path) != sha256:
        raise UserError(f"[model] weights = {path!r}: its SHA-256 is not the recorded "
                        f"{sha256[:12]}…; the file changed since the run started")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"[model] weights = {path!r}: not a safetensors file ({err})") from None
    own = net.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise UserError(f"[model] weights = {path!r}: tensor {unknown[0]!r} is not in the "
                        "model")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(f"[model] weights = {path!r}: {key!r} has shape "
                            f"{tuple(value.shape)}, the model's is {tuple(own[key].shape)}")
    net.load_state_dict(tensors, strict=False)


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
