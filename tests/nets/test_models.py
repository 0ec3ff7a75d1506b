"""Tests for diverse.nets.models: shapes, exact parameter counts, vmap == loop, dropout, norms."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from diverse.errors import UserError
from diverse.nets.models import (
    MODELS,
    LeNetConfig,
    LinearConfig,
    MLPConfig,
    PreActResNetConfig,
    ResNetConfig,
    build_model,
)

SHAPES = [(1, 28, 28), (3, 32, 32)]

# Every registry name plus the non-default variants that change the graph.
CONFIGS = {
    "linear": LinearConfig(),
    "mlp": MLPConfig(),
    "mlp-tanh-dropout": MLPConfig(hidden=(32, 16, 8), activation="tanh", dropout=0.3),
    "lenet5": LeNetConfig(),
    "lenet5-dropout": LeNetConfig(activation="gelu", dropout=0.5),
    "resnet20": ResNetConfig(),
    "resnet20-group": ResNetConfig(norm="group"),
    "resnet20-none": ResNetConfig(norm="none"),
    "resnet32": ResNetConfig(name="resnet32"),
    "resnet56": ResNetConfig(name="resnet56", norm="none"),
    "preact-resnet18": PreActResNetConfig(),
    "preact-resnet18-group": PreActResNetConfig(norm="group", width=8),
    "preact-resnet18-none": PreActResNetConfig(norm="none", width=8),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- hand formulas


def conv(cin: int, cout: int, k: int, bias: bool) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def norm_params(norm: str, c: int) -> int:
    return 2 * c if norm in ("batch", "group") else 0


def cifar_resnet_count(depth: int, cin: int, width: int, nout: int, norm: str) -> int:
    """He et al. 2016 CIFAR ResNet, option-A shortcuts (no shortcut parameters)."""
    n, bias = (depth - 2) // 6, norm == "none"
    total = conv(cin, width, 3, bias) + norm_params(norm, width)
    c_in = width
    for planes in (width, 2 * width, 4 * width):
        for _ in range(n):
            total += conv(c_in, planes, 3, bias) + norm_params(norm, planes)
            total += conv(planes, planes, 3, bias) + norm_params(norm, planes)
            c_in = planes
    return total + linear(4 * width, nout)


def preact18_count(cin: int, width: int, nout: int, norm: str) -> int:
    """Pre-activation ResNet-18: 1x1 projection shortcuts, final norm before pooling."""
    bias = norm == "none"
    total = conv(cin, width, 3, bias)
    c_in = width
    for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for j in range(2):
            stride = 2 if (i > 0 and j == 0) else 1
            total += norm_params(norm, c_in) + conv(c_in, planes, 3, bias)
            total += norm_params(norm, planes) + conv(planes, planes, 3, bias)
            if stride != 1 or c_in != planes:
                total += conv(c_in, planes, 1, bias)
            c_in = planes
    return total + norm_params(norm, c_in) + linear(c_in, nout)


# --------------------------------------------------------------------------- shapes, counts


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("key", list(CONFIGS))
def test_output_shape(key: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIGS[key], shape, 7).eval()
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_parameter_counts_closed_form() -> None:
    # Linear: 784*10 + 10. MLP 784-200-200-10: 784*200+200 + 200*200+200 + 200*10+10.
    assert n_params(build_model(LinearConfig(), (1, 28, 28), 10)) == 7_850
    assert n_params(build_model(MLPConfig(), (1, 28, 28), 10)) == 199_210
    assert 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10 == 199_210
    # LeNet-5: conv1 (padding 2 keeps 32x32 geometry) + conv2 + fc 400-120-84-10.
    lenet = conv(1, 6, 5, True) + conv(6, 16, 5, True)
    lenet += linear(400, 120) + linear(120, 84) + linear(84, 10)
    assert lenet == 61_706
    assert n_params(build_model(LeNetConfig(), (1, 28, 28), 10)) == 61_706
    assert n_params(build_model(LeNetConfig(), (3, 32, 32), 10)) == 61_706 + 2 * 150


@pytest.mark.parametrize(
    ("name", "norm", "width", "shape"),
    [
        ("resnet20", "batch", 16, (3, 32, 32)),
        ("resnet20", "none", 16, (3, 32, 32)),
        ("resnet32", "group", 16, (1, 28, 28)),
        ("resnet56", "batch", 8, (3, 32, 32)),
    ],
)
def test_cifar_resnet_parameter_count(name: str, norm: str, width: int, shape) -> None:
    model = build_model(ResNetConfig(name=name, norm=norm, width=width), shape, 10)
    depth = int(name.removeprefix("resnet"))
    assert n_params(model) == cifar_resnet_count(depth, shape[0], width, 10, norm)


def test_cifar_resnet20_matches_paper() -> None:
    # Option A ResNet-20 with BatchNorm: the "0.27M" of He et al. (2016), Table 6.
    assert cifar_resnet_count(20, 3, 16, 10, "batch") == 269_722
    assert n_params(build_model(ResNetConfig(), (3, 32, 32), 10)) == 269_722
    # Option A has no shortcut parameters at all.
    model = build_model(ResNetConfig(), (3, 32, 32), 10)
    assert not any("shortcut" in k for k, _ in model.named_parameters())


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_preact_resnet18_parameter_count(norm: str) -> None:
    model = build_model(PreActResNetConfig(norm=norm), (3, 32, 32), 10)
    assert n_params(model) == preact18_count(3, 64, 10, norm)
    if norm == "batch":
        # kuangliu/pytorch-cifar PreActResNet18 (11,171,146) + the paper's final BN(512).
        assert n_params(model) == 11_171_146 + 2 * 512


def test_kaiming_init() -> None:
    torch.manual_seed(0)
    model = build_model(MLPConfig(hidden=(1000, 1000)), (1, 28, 28), 500)
    # Hidden layers: std = sqrt(2 / fan_in) (ReLU gain); output layer: sqrt(1 / fan_in).
    assert model.fc1.weight.std().item() == pytest.approx(math.sqrt(2 / 784), rel=0.02)
    assert model.fc2.weight.std().item() == pytest.approx(math.sqrt(2 / 1000), rel=0.02)
    assert model.out.weight.std().item() == pytest.approx(math.sqrt(1 / 1000), rel=0.02)
    assert all((m.bias == 0).all() for m in (model.fc1, model.fc2, model.out))
    tanh = build_model(MLPConfig(hidden=(1000,), activation="tanh"), (1, 28, 28), 10)
    assert tanh.fc1.weight.std().item() == pytest.approx(5 / 3 / math.sqrt(784), rel=0.02)


# --------------------------------------------------------------------------- feature layers

FEATURE_LAYERS = {
    "linear": ("fc",),
    "mlp": ("act1", "act2"),
    "mlp-tanh-dropout": ("act1", "act2", "act3"),
    "lenet5": ("features.pool1", "features.pool2", "classifier.act3", "classifier.act4"),
    "resnet20": ("layer1", "layer2", "layer3", "pool"),
    "preact-resnet18-none": ("layer1", "layer2", "layer3", "layer4", "pool"),
}


@pytest.mark.parametrize("key", list(FEATURE_LAYERS))
def test_feature_layers_resolve_and_capture(key: str) -> None:
    model = build_model(CONFIGS[key], (1, 28, 28), 10).eval()
    assert model.feature_layers == FEATURE_LAYERS[key]
    captured: dict[str, torch.Tensor] = {}
    for name in model.feature_layers:
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out)
        )
    model(torch.randn(3, 1, 28, 28))
    assert list(captured) == list(model.feature_layers)
    assert all(v.shape[0] == 3 for v in captured.values())


def test_named_blocks() -> None:
    resnet = build_model(ResNetConfig(name="resnet32"), (3, 32, 32), 10)
    assert resnet.get_submodule("layer2.4.conv2").weight.shape == (32, 32, 3, 3)
    assert resnet.pool.__class__.__name__ == "GlobalAvgPool"
    lenet = build_model(LeNetConfig(dropout=0.1), (1, 28, 28), 10)
    assert lenet.get_submodule("features.conv1").padding == (2, 2)
    assert [n for n, _ in lenet.classifier.named_children()] == [
        "flatten", "drop1", "fc1", "act3", "drop2", "fc2", "act4", "drop3", "fc3",
    ]  # fmt: skip
    lenet32 = build_model(LeNetConfig(), (3, 32, 32), 10)
    assert lenet32.get_submodule("features.conv1").padding == (0, 0)
    preact = build_model(PreActResNetConfig(width=8), (3, 32, 32), 10)
    assert isinstance(preact.get_submodule("layer3.0.shortcut"), nn.Conv2d)
    assert not hasattr(preact.get_submodule("layer3.1"), "shortcut")


# --------------------------------------------------------------------------- vmap == loop


def _stack(cfg, shape: tuple[int, ...], m: int = 3, train: bool = False):
    torch.manual_seed(0)
    members = [build_model(cfg, shape, 5).train(train) for _ in range(m)]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")

    def call(p, b, x):
        return functional_call(base, (p, b), (x,))

    fn = vmap(call, in_dims=(0, 0, None), randomness="different")
    return members, params, buffers, fn


@pytest.mark.parametrize("key", list(CONFIGS))
def test_vmap_matches_members_eval(key: str) -> None:
    # ResNets take any spatial size; 16x16 keeps the suite fast.
    shape = (1, 28, 28) if key.startswith(("lenet", "linear", "mlp")) else (3, 16, 16)
    members, params, buffers, fn = _stack(CONFIGS[key], shape)
    x = torch.randn(2, *shape)
    out = fn(params, buffers, x)
    assert out.shape == (3, 2, 5)
    for i, member in enumerate(members):
        torch.testing.assert_close(out[i], member(x), rtol=1e-5, atol=1e-5)
    # members are independently initialised
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize(
    "key", ["mlp", "lenet5", "resnet20", "resnet20-group", "resnet20-none", "preact-resnet18-group"]
)
def test_vmap_matches_members_train(key: str) -> None:
    """Train mode: BatchNorm uses batch stats and the stacked running stats update per member."""
    shape = (1, 28, 28) if key in ("mlp", "lenet5") else (3, 16, 16)
    members, params, buffers, fn = _stack(CONFIGS[key], shape, train=True)
    x = torch.randn(4, *shape)
    for step in range(2):
        out = fn(params, buffers, x + step)
        for i, member in enumerate(members):
            torch.testing.assert_close(out[i], member(x + step), rtol=1e-5, atol=1e-5)
    for name, stacked in buffers.items():
        for i, member in enumerate(members):
            torch.testing.assert_close(stacked[i], member.get_buffer(name), rtol=1e-5, atol=1e-6)
    if key == "resnet20":
        assert buffers["norm1.num_batches_tracked"].tolist() == [2, 2, 2]
        assert not torch.allclose(buffers["norm1.running_var"], torch.ones(3, 16))


def test_vmap_matches_members_train_batchnorm_preact() -> None:
    members, params, buffers, fn = _stack(PreActResNetConfig(), (3, 16, 16), train=True)
    x = torch.randn(2, 3, 16, 16)
    out = fn(params, buffers, x)
    for i, member in enumerate(members):
        torch.testing.assert_close(out[i], member(x), rtol=1e-4, atol=1e-5)
    for i, member in enumerate(members):
        torch.testing.assert_close(
            buffers["layer4.1.norm2.running_mean"][i], member.layer4[1].norm2.running_mean
        )


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("key", ["mlp-tanh-dropout", "lenet5-dropout"])
def test_dropout_train_vs_eval(key: str) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIGS[key], (1, 28, 28), 5)
    x = torch.randn(4, 1, 28, 28)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    # Three identical members under vmap(randomness="different") get different masks.
    p = {k: v.detach().expand(3, *v.shape) for k, v in model.named_parameters()}
    b = {k: v.expand(3, *v.shape) for k, v in model.named_buffers()}
    fn = vmap(
        lambda p, b, x: functional_call(model, (p, b), (x,)),
        in_dims=(0, 0, None),
        randomness="different",
    )
    model.train()
    out = fn(p, b, x)
    assert not torch.allclose(out[0], out[1])
    model.eval()
    out = fn(p, b, x)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    torch.testing.assert_close(out[0], model(x), rtol=1e-5, atol=1e-5)


def test_no_dropout_modules_when_zero() -> None:
    for cfg in (MLPConfig(), LeNetConfig()):
        model = build_model(cfg, (1, 28, 28), 10)
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    model = build_model(MLPConfig(dropout=0.2), (1, 28, 28), 10)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Dropout)] == ["drop1", "drop2"]


# --------------------------------------------------------------------------- norms


@pytest.mark.parametrize(
    "cfg", [ResNetConfig(norm="group"), PreActResNetConfig(norm="group", width=16)]
)
def test_group_norm_variant(cfg) -> None:
    model = build_model(cfg, (3, 32, 32), 10)
    mods = list(model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods)
    gns = [m for m in mods if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.num_groups == 8 for m in gns)
    assert not any(isinstance(m, nn.Conv2d) and m.bias is not None for m in mods)
    assert len(list(model.buffers())) == 0


@pytest.mark.parametrize("cfg", [ResNetConfig(norm="none"), PreActResNetConfig(norm="none")])
def test_no_norm_variant(cfg) -> None:
    model = build_model(cfg, (3, 32, 32), 10)
    mods = list(model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm) for m in mods)
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    assert all(m.bias is not None for m in convs)
    # The last conv of every residual branch starts at zero; the first does not.
    blocks = [m for n, m in model.named_modules() if n.count(".") == 1 and n.startswith("layer")]
    assert blocks and all((b.conv2.weight == 0).all() for b in blocks)
    assert all(b.conv1.weight.abs().sum() > 0 for b in blocks)


def test_group_count_capped_at_channels() -> None:
    model = build_model(ResNetConfig(norm="group", groups=32), (3, 32, 32), 10)
    assert model.norm1.num_groups == 16 and model.layer3[0].norm1.num_groups == 32


def test_resnet20_without_norm_trains() -> None:
    torch.manual_seed(0)
    model = build_model(ResNetConfig(norm="none"), (3, 16, 16), 10)
    # Smooth (low-frequency) images: global pooling of i.i.d. pixel noise would make all
    # inputs look alike to an unnormalised net.
    x = F.interpolate(torch.randn(16, 3, 4, 4), size=16, mode="bilinear")
    y = torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] < 3.0  # near ln(10) = 2.30: zero-initialised branches keep logits sane
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("name", ["resnet56", "preact-resnet18"])
def test_deep_nets_without_norm_have_sane_initial_logits(name: str) -> None:
    cfg = PreActResNetConfig(norm="none", width=8) if name.startswith("preact") else None
    cfg = cfg or ResNetConfig(name=name, norm="none")
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    logits = build_model(cfg, (3, 16, 16), 10)(x)
    # Without the zero init, 27 doubling residual stages would give logits ~ 1e3 and more.
    assert logits.abs().max() < 10


# --------------------------------------------------------------------------- configs, errors


def test_registry_and_configs() -> None:
    allowed_types = {"str", "int", "float", "bool", "tuple[int, ...]"}
    for name, (cfg_cls, builder) in MODELS.items():
        fields = dataclasses.fields(cfg_cls)
        assert fields[0].name == "name"
        assert cfg_cls.__dataclass_params__.frozen
        assert all(f.type in allowed_types for f in fields), name
        doc = cfg_cls.__doc__ or ""
        for f in fields:
            assert f"{f.name}:" in doc and str(f.default) in doc, (name, f.name)
        if name == "custom":  # needs a user factory: built in tests/app/test_custom_model.py
            with pytest.raises(UserError, match="expected \"module:function\""):
                cfg_cls(name=name)
            continue
        cfg = cfg_cls(name=name)
        model = builder(cfg, (1, 28, 28), 3)
        assert isinstance(model.feature_layers, tuple) and model.feature_layers
    for name in ("linear", "mlp", "lenet5", "resnet20", "preact-resnet18"):
        assert MODELS[name][0]().name == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        MLPConfig().dropout = 0.5  # type: ignore[misc]
    assert MLPConfig(hidden=[10, 5]).hidden == (10, 5)  # type: ignore[arg-type]


def test_build_is_seeded() -> None:
    torch.manual_seed(3)
    a = build_model(ResNetConfig(), (3, 32, 32), 10)
    torch.manual_seed(3)
    b = build_model(ResNetConfig(), (3, 32, 32), 10)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb)


@dataclasses.dataclass(frozen=True)
class _VGGConfig:
    name: str = "vgg16"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: build_model(_VGGConfig(), (3, 32, 32), 10), "unknown model 'vgg16'"),
        (lambda: MLPConfig(activation="swish"), "unknown activation 'swish'; allowed: elu"),
        (lambda: LeNetConfig(activation="sigmoid"), "unknown activation 'sigmoid'"),
        (lambda: ResNetConfig(norm="layer"), "unknown norm 'layer'; allowed: batch, group"),
        (lambda: PreActResNetConfig(norm="instance"), "unknown norm 'instance'"),
        (lambda: ResNetConfig(name="resnet18"), "unknown CIFAR ResNet 'resnet18'"),
        (lambda: ResNetConfig(norm="group", groups=3), "does not divide 16"),
        (lambda: ResNetConfig(width=0), "width must be a positive integer"),
        (lambda: MLPConfig(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (lambda: MLPConfig(hidden=(10, 0)), "hidden must be positive"),
        (lambda: build_model(ResNetConfig(), (784,), 10), "needs an image input_shape"),
        (lambda: build_model(LeNetConfig(), (1, 12, 12), 10), "lenet5 needs H, W >= 16"),
        (lambda: build_model(MLPConfig(), (1, 28, 28), 0), "num_outputs must be"),
        (lambda: build_model(MLPConfig(), (), 10), "input_shape must be"),
        (lambda: build_model(LinearConfig(name="mlp"), (4,), 2), "needs a MLPConfig"),
    ],
)
def test_user_errors(make, match: str) -> None:
    with pytest.raises(UserError, match=match):
        make()
