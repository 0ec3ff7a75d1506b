"""The hypernetwork: generated parameters, vectorized forward, init scale, training."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from diverse.errors import UserError
from diverse.nets.hypernet import (
    ChunkedGenerator,
    HyperNetConfig,
    HyperNetwork,
    LinearGenerator,
    NormalizedGenerator,
)
from diverse.nets.models import LeNetConfig, MLPConfig, ResNetConfig, build_model

SMALL = HyperNetConfig(z_dim=8, hidden=32, code_dim=8, train_members=3, predict_members=4)

TARGETS = {
    "mlp": (lambda: build_model(MLPConfig(hidden=(16, 8)), (1, 6, 6), 3), (1, 6, 6)),
    "lenet5": (lambda: build_model(LeNetConfig(), (1, 28, 28), 10), (1, 28, 28)),
    # ResNet-20's full depth at a reduced width and image size, to keep the test fast
    "resnet20-gn": (lambda: build_model(ResNetConfig(norm="group", width=4, groups=2),
                                        (3, 16, 16), 10), (3, 16, 16)),
    "resnet20-none": (lambda: build_model(ResNetConfig(norm="none", width=4), (3, 16, 16), 10),
                      (3, 16, 16)),
}


def _make(case: str, cfg: HyperNetConfig = SMALL, seed: int = 0):
    torch.manual_seed(seed)
    factory, shape = TARGETS[case]
    target = factory()
    return target, HyperNetwork(target, cfg), shape


def _looped(target: nn.Module, params: dict, x: torch.Tensor) -> torch.Tensor:
    """Oracle: each generated member run separately on the real target module."""
    members = next(iter(params.values())).shape[0]
    return torch.stack([
        functional_call(target, {k: v[m] for k, v in params.items()}, (x,), strict=False)
        for m in range(members)
    ])


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize(("field", "value"), [
    ("z_dim", 0), ("hidden", -1), ("depth", 0), ("code_dim", 1), ("train_members", 0),
    ("predict_members", 2.5), ("chunk", -1), ("seed", -3), ("z_dim", True),
    ("code_lr", 0.0), ("code_lr", float("inf")), ("code_lr", "fast"), ("weight_norm", "yes"),
    ("weight_norm", 1),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(UserError, match=field):
        HyperNetConfig(**{field: value})


def test_batchnorm_target_is_rejected():
    target = build_model(ResNetConfig(norm="batch", width=4), (3, 16, 16), 10)
    with pytest.raises(UserError, match="CifarResNet.*BatchNorm2d"):
        HyperNetwork(target, SMALL)


def test_wrong_code_shape_is_rejected():
    _, hyper, _ = _make("mlp")
    with pytest.raises(UserError, match=r"\(K, 8\)"):
        hyper.generate(torch.randn(3, 7))


# -------------------------------------------------------------- generated shapes
@pytest.mark.parametrize("case", sorted(TARGETS))
def test_generated_names_and_shapes_match_the_target(case):
    target, hyper, _ = _make(case)
    params = hyper.generate(torch.randn(5, SMALL.z_dim))
    expected = {k: (5, *v.shape) for k, v in target.named_parameters()}
    assert list(params) == list(expected)
    assert {k: tuple(v.shape) for k, v in params.items()} == expected
    assert hyper.layers == tuple(dict.fromkeys(k.rpartition(".")[0] for k in expected))
    assert hyper.layer_codes(torch.randn(5, 8)).shape == (5, len(hyper.layers), 8)


def _expected_parameter_count(target: nn.Module, cfg: HyperNetConfig, layers: int) -> int:
    trunk = cfg.z_dim * cfg.hidden + cfg.hidden + (cfg.depth - 1) * (cfg.hidden + 1) * cfg.hidden
    head = (cfg.hidden + 1) * layers * cfg.code_dim
    gens = 0
    for p in target.parameters():
        n = p.numel()
        if cfg.chunk and n > cfg.chunk:
            gens += n + cfg.chunk * cfg.code_dim + math.ceil(n / cfg.chunk) * cfg.code_dim**2
        else:
            gens += n * (cfg.code_dim + 1)
    return trunk + head + gens


@pytest.mark.parametrize("chunk", [0, 1024])
def test_own_parameters_only_generator_parameters(chunk):
    cfg = HyperNetConfig(z_dim=8, hidden=32, depth=3, code_dim=8, chunk=chunk)
    target, hyper, _ = _make("lenet5", cfg)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    names = [n for n, _ in hyper.named_parameters()]
    assert all(n.split(".")[0] in ("trunk", "head", "generators") for n in names)
    target_ids = {id(p) for p in target.parameters()}
    assert not target_ids & {id(p) for p in hyper.parameters()}
    assert sum(p.numel() for p in hyper.parameters()) == _expected_parameter_count(
        target, cfg, len(hyper.layers))
    # the user's module is left as it was; the kept skeleton has no storage
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert all(p.device.type == "cpu" for p in target.parameters())
    assert all(p.is_meta for p in hyper.target.parameters())
    kinds = {n: type(g) for n, g in zip(hyper.names, hyper.generators, strict=True)}
    # more than 1024 elements: 2400, 48000 and 10080
    big = {"features.conv2.weight", "classifier.fc1.weight", "classifier.fc2.weight"}
    for name, kind in kinds.items():
        assert kind is (ChunkedGenerator if chunk and name in big else LinearGenerator)


def test_chunked_generator_matches_its_equation():
    torch.manual_seed(0)
    gen = ChunkedGenerator((7, 5), code_dim=3, mean=0.5, std=0.2, chunk=8)  # 35 = 4*8 + 3
    assert gen.mix.shape == (5, 3, 3) and gen.basis.shape == (8, 3)
    code = torch.randn(2, 3)
    out = gen(code)
    for k in range(2):
        pieces = [gen.basis @ (gen.mix[j] @ code[k]) for j in range(5)]
        flat = torch.cat(pieces)[:35] + gen.bias
        torch.testing.assert_close(out[k], flat.reshape(7, 5))


@pytest.mark.parametrize("kind", ["linear", "chunked"])
def test_code_lr_keeps_the_init_and_scales_the_first_adam_step(kind):
    # θ = r·G' c/code_dim + b with G' = G·code_dim/r: same tensors at init; Adam's first
    # step is lr·sign(grad) on G', so the member-specific part G moves r times as far
    def make(code_lr):
        torch.manual_seed(0)
        if kind == "linear":
            return LinearGenerator((6, 4), code_dim=5, mean=0.0, std=0.3,
                                   code_lr=code_lr).double()
        return ChunkedGenerator((6, 4), code_dim=5, mean=0.0, std=0.3, chunk=10,
                                code_lr=code_lr).double()

    def effective(gen):  # the member-specific linear map, code → flat tensor minus offset
        eye = torch.eye(5, dtype=torch.float64)
        return (gen(eye).reshape(5, -1) - gen.bias).detach()

    code = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64)
    moves = {}
    for code_lr in (1.0, 4.0):
        gen = make(code_lr)
        before = effective(gen)
        if code_lr == 1.0:
            reference = before
        else:
            torch.testing.assert_close(before, reference, rtol=1e-12, atol=1e-14)
        opt = torch.optim.Adam([gen.weight if kind == "linear" else gen.basis], lr=1e-3)
        (gen(code) - target).square().sum().backward()
        opt.step()
        moves[code_lr] = effective(gen) - before
    torch.testing.assert_close(moves[4.0], 4.0 * moves[1.0], rtol=1e-4, atol=0)  # Adam's eps


@pytest.mark.parametrize("case", ["lenet5", "resnet20-gn"])
def test_weight_norm_gives_every_member_the_shared_row_norms(case):
    target, plain, _ = _make(case)
    _, normed, _ = _make(case, dataclasses.replace(SMALL, weight_norm=True))
    init = dict(target.named_parameters())
    z = torch.randn(3, SMALL.z_dim)
    with torch.no_grad():
        p_plain, p_normed = plain.generate(z), normed.generate(z)
    wrapped = 0
    for name, gen, tensor in zip(normed.names, normed.generators, init.values(), strict=True):
        if isinstance(gen, NormalizedGenerator):
            wrapped += 1
            assert tensor.dim() >= 2
            # row norms = the gain, initialized to the target's own row norms, for every member
            rows = p_normed[name].flatten(2).norm(dim=2)
            torch.testing.assert_close(rows, tensor.flatten(1).norm(dim=1).expand(3, -1))
            # same directions as the unnormalized generator of the same init draw
            unit = p_plain[name].flatten(2) / p_plain[name].flatten(2).norm(dim=2, keepdim=True)
            torch.testing.assert_close(p_normed[name].flatten(2) / rows.unsqueeze(2), unit)
        else:  # biases and constant tensors are generated as without weight_norm
            torch.testing.assert_close(p_normed[name], p_plain[name])
    assert wrapped == sum(t.dim() >= 2 for t in init.values() if t.std() > 0)


def test_normalized_generator_gain_sets_the_norm_and_gets_gradients():
    torch.manual_seed(0)
    gen = NormalizedGenerator(LinearGenerator((4, 3), code_dim=5, mean=0.0, std=0.5),
                              torch.tensor([1.0, 2.0, 3.0, 4.0]))
    out = gen(torch.randn(2, 5))
    torch.testing.assert_close(out.norm(dim=2), torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 2))
    out[:, 1].sum().backward()
    assert gen.gain.grad[1] != 0 and bool((gen.gain.grad[[0, 2, 3]] == 0).all())


# ----------------------------------------------------------------- forward
@pytest.mark.parametrize("case", sorted(TARGETS))
def test_forward_equals_each_generated_member_alone(case):
    target, hyper, shape = _make(case)
    x = torch.randn(2, *shape)
    hyper.eval()
    with torch.no_grad():
        out = hyper(x)
        expected = _looped(target.eval(), hyper.generate(hyper.predict_codes), x)
    assert out.shape == (SMALL.predict_members, 2, target(x).shape[-1])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    z = torch.randn(3, SMALL.z_dim)
    hyper.train()
    with torch.no_grad():
        torch.testing.assert_close(
            hyper(x, z), _looped(target.train(), hyper.generate(z), x), atol=1e-5, rtol=1e-5)


def test_target_buffers_are_passed_to_members_and_follow_dtype():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.register_buffer("scale", torch.tensor([2.0, -3.0]))

        def forward(self, x):
            return self.fc(x) * self.scale

    target = Scaled()
    hyper = HyperNetwork(target, SMALL).double().eval()
    bufs = hyper.target_buffers(4)
    assert bufs["scale"].shape == (4, 2) and bufs["scale"].dtype == torch.float64
    x = torch.randn(5, 3, dtype=torch.float64)
    params = hyper.generate(hyper.predict_codes)
    expected = torch.stack([
        F.linear(x, params["fc.weight"][m], params["fc.bias"][m]) * torch.tensor([2.0, -3.0])
        for m in range(4)
    ]).double()
    torch.testing.assert_close(hyper(x), expected)


def test_eval_is_deterministic_and_train_draws_fresh_members():
    _, hyper, shape = _make("mlp")
    x = torch.randn(6, *shape)
    hyper.eval()
    torch.testing.assert_close(hyper(x), hyper(x), rtol=0, atol=0)
    # prediction codes come from the config seed only, not from the global RNG
    reference = torch.randn(SMALL.predict_members, SMALL.z_dim,
                            generator=torch.Generator().manual_seed(SMALL.seed))
    torch.testing.assert_close(hyper.predict_codes, reference, rtol=0, atol=0)
    _, other, _ = _make("mlp", seed=7)
    torch.testing.assert_close(other.predict_codes, reference, rtol=0, atol=0)
    hyper.train()
    first, second = hyper(x), hyper(x)
    assert first.shape[0] == SMALL.train_members
    assert (first - second).abs().max() > 1e-2
    torch.manual_seed(123)
    a = hyper(x)
    torch.manual_seed(123)
    b = hyper(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_round_trip_restores_predictions():
    _, hyper, shape = _make("mlp")
    _, fresh, _ = _make("mlp", seed=3)  # another init, the same prediction codes
    x = torch.randn(4, *shape)
    assert (fresh.eval()(x) - hyper.eval()(x)).abs().max() > 1e-2
    assert "predict_codes" not in hyper.state_dict()  # derived from the seed, not saved
    fresh.load_state_dict(hyper.state_dict())
    torch.testing.assert_close(fresh(x), hyper(x), rtol=0, atol=0)
    # other codes (seed, K) over the same generator: other networks of the same model
    cfg = HyperNetConfig(**{**SMALL.__dict__, "seed": 5, "predict_members": 2})
    _, other, _ = _make("mlp", cfg, seed=3)
    other.load_state_dict(hyper.state_dict())
    assert other.eval()(x).shape[0] == 2
    assert (other(x)[0] - hyper(x)[0]).abs().max() > 1e-3


def test_gradients_reach_every_hypernetwork_parameter():
    cfg = HyperNetConfig(z_dim=8, hidden=32, code_dim=8, chunk=1024, train_members=3)
    _, hyper, shape = _make("lenet5", cfg)
    x = torch.randn(4, *shape)
    y = torch.tensor([0, 3, 5, 9])
    out = hyper(x)
    F.cross_entropy(out.reshape(-1, 10), y.repeat(out.shape[0])).backward()
    for name, p in hyper.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------- init
def _kaiming_std(name: str, shape: tuple[int, ...], output_layer: str) -> float:
    gain = 1.0 if name.startswith(output_layer) else math.sqrt(2.0)
    return gain / math.sqrt(math.prod(shape[1:]))


@pytest.mark.parametrize(("case", "output_layer", "chunk"), [
    ("mlp", "out.", 0), ("lenet5", "classifier.fc3.", 0), ("lenet5", "classifier.fc3.", 1024),
    ("resnet20-gn", "fc.", 0),
])
def test_generated_weights_have_the_scale_of_kaiming_init(case, output_layer, chunk):
    cfg = HyperNetConfig(**{**SMALL.__dict__, "chunk": chunk, "predict_members": 6,
                            "spread": 1.0})
    target, hyper, _ = _make(case, cfg)
    with torch.no_grad():
        params = hyper.generate(hyper.predict_codes)
        many = hyper.generate(torch.randn(400, cfg.z_dim))
    for name, p in target.named_parameters():
        gen = params[name]
        if p.dim() >= 2:  # conv / linear weights: per member std ≈ gain/sqrt(fan_in)
            std = _kaiming_std(name, tuple(p.shape), output_layer)
            ratio = gen.flatten(1).std(dim=1) / std
            assert ratio.min() > 1 / 1.5 and ratio.max() < 1.5, (name, ratio)
            # centred like Kaiming: no offset shared by the members (rms ≈ std/20 over 400)
            assert many[name].mean(0).square().mean().sqrt() < 0.15 * std, name
        else:  # biases start at 0, GroupNorm scales at 1, exactly as in the target
            torch.testing.assert_close(gen, p.detach().expand_as(gen), rtol=0, atol=0)


def _member_correlations(spread: float) -> tuple[torch.Tensor, list[float]]:
    cfg = HyperNetConfig(predict_members=20, spread=spread)  # z_dim = code_dim = 32
    target, hyper, _ = _make("lenet5", cfg)
    with torch.no_grad():
        params = hyper.generate(hyper.predict_codes)
    corrs, ratios = [], []
    for name, p in target.named_parameters():
        if p.dim() >= 2:
            w = params[name].flatten(1)
            ratios.append(float(w.square().mean().sqrt() / p.detach().square().mean().sqrt()))
            w = (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True)
            c = w @ w.T / (w.shape[1] - 1)
            corrs.append(c[~torch.eye(20, dtype=torch.bool)].mean())
    return torch.stack(corrs), ratios


def test_initial_members_are_uncorrelated_on_average():
    corrs, _ = _member_correlations(spread=1.0)
    # a ReLU trunk gives ~0.5 here; tanh codes are centred
    assert corrs.abs().max() < 0.1


@pytest.mark.parametrize("spread", [0.3, 0.6])
def test_spread_sets_the_member_correlation_and_keeps_the_init_scale(spread):
    # θ = sqrt(1 − s²)·θ_target + s·G c: corr(θ_m, θ_n) = 1 − s², rms ≈ the target's
    corrs, ratios = _member_correlations(spread)
    torch.testing.assert_close(corrs, torch.full_like(corrs, 1 - spread**2), atol=0.03, rtol=0)
    assert all(0.85 < r < 1.15 for r in ratios), ratios


@pytest.mark.parametrize("spread", [0.1, 0.3])
def test_different_codes_give_different_functions(spread):
    _, hyper, shape = _make("lenet5", dataclasses.replace(SMALL, spread=spread))
    x = torch.randn(16, *shape)
    with torch.no_grad():
        out = hyper.eval()(x)
    dist = (out[:, None] - out[None]).norm(dim=-1).mean(-1)  # (K, K)
    off = dist[~torch.eye(out.shape[0], dtype=torch.bool)]
    # members differ by ~spread × the init scale: output distances scale with it
    assert off.min() > 0.67 * spread * out.norm(dim=-1).mean()


# ----------------------------------------------------------------- features
def test_forward_features_equal_hooked_per_member_calls():
    target, hyper, shape = _make("lenet5")
    layers = target.feature_layers
    x = torch.randn(3, *shape)
    z = torch.randn(3, SMALL.z_dim)
    out, feats = hyper.forward_features(x, layers, z=z)
    assert list(feats) == list(layers)
    params = hyper.generate(z)
    named = dict(target.named_modules())
    for m in range(3):
        captured = {}
        handles = [named[n].register_forward_hook(
            lambda _mod, _inp, o, n=n, store=captured: store.__setitem__(n, o)) for n in layers]
        with torch.no_grad():
            ref = functional_call(target, {k: v[m] for k, v in params.items()}, (x,))
        for h in handles:
            h.remove()
        torch.testing.assert_close(out[m].detach(), ref, atol=1e-5, rtol=1e-5)
        for n in layers:
            assert feats[n].shape == (3, *captured[n].shape)
            torch.testing.assert_close(feats[n][m].detach(), captured[n], atol=1e-5, rtol=1e-5)
    # features stay differentiable with respect to the hypernetwork
    feats[layers[-1]].square().sum().backward()
    assert hyper.head.weight.grad.abs().sum() > 0
    with pytest.raises(UserError, match="classifier.nope"):
        hyper.forward_features(x, ["classifier.nope"])


# ----------------------------------------------------------------- training
def test_short_training_makes_every_sampled_member_accurate():
    torch.manual_seed(0)
    x = torch.rand(256, 2) * 2 - 1
    y = (x[:, 0] * x[:, 1] > 0).long()  # XOR quadrants: no linear model exceeds ~0.6
    x_test = torch.rand(512, 2) * 2 - 1
    y_test = (x_test[:, 0] * x_test[:, 1] > 0).long()
    target = build_model(MLPConfig(hidden=(16,)), (2,), 2)
    cfg = HyperNetConfig(z_dim=8, hidden=32, code_dim=8, train_members=4, predict_members=8)
    hyper = HyperNetwork(target, cfg)
    opt = torch.optim.Adam(hyper.parameters(), lr=1e-2)
    for _ in range(300):
        out = hyper(x)
        loss = F.cross_entropy(out.reshape(-1, 2), y.repeat(out.shape[0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc_predict = (hyper.eval()(x_test).argmax(-1) == y_test).float().mean(1)
        acc_fresh = (hyper.train()(x_test).argmax(-1) == y_test).float().mean(1)
    assert acc_predict.shape == (8,) and acc_fresh.shape == (4,)
    assert acc_predict.min() > 0.95 and acc_fresh.min() > 0.95
