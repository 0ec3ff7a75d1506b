"""CIFAR ResNets (20/32/56) and the pre-activation ResNet-18: configs, modules and
builders (:mod:`diverse.nets.models`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diverse.errors import UserError
from diverse.nets.models._common import (
    _RESNET_DEPTHS,
    GlobalAvgPool,
    _check_groups,
    _check_image_shape,
    _check_norm,
    _check_shape,
    _check_width,
    _init_all,
    _make_norm,
)


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


