"""The ensemble core: vmap and loop executions agree; embeddings and pull-back."""

import json

import pytest
import torch
from torch import nn

from diverse.errors import UserError
from diverse.nets.ensemble import (
    Ensemble,
    flatten_params,
    init_members,
    pull_back,
    unflatten_params,
)
from diverse.nets.models import LeNetConfig, MLPConfig, ResNetConfig, build_model

CASES = {
    "mlp": (lambda: build_model(MLPConfig(hidden=(16, 8)), (1, 6, 6), 3), (1, 6, 6)),
    "lenet5": (lambda: build_model(LeNetConfig(), (1, 28, 28), 10), (1, 28, 28)),
    # ResNet-20's full depth at a reduced width and image size, to keep the test fast
    "resnet20-bn": (lambda: build_model(ResNetConfig(norm="batch", width=4), (3, 16, 16), 10),
                    (3, 16, 16)),
    "resnet20-gn": (lambda: build_model(ResNetConfig(norm="group", width=4, groups=2),
                                        (3, 16, 16), 10), (3, 16, 16)),
}


def _loss_grads(ens: Ensemble, x: torch.Tensor, execution: str):
    params = {k: v.detach().clone().requires_grad_(True) for k, v in ens.params.items()}
    buffers = {k: v.clone() for k, v in ens.member_buffers.items()}
    out = ens.apply(params, x, buffers=buffers, execution=execution)
    # a loss that weights members differently, so a mix-up of members would show
    weights = torch.arange(1, out.shape[0] + 1, dtype=out.dtype).view(-1, 1, 1)
    (out.square() * weights).sum().backward()
    return out.detach(), {k: v.grad for k, v in params.items()}, buffers


# ResNets are compared in float64 only: their normalization backward in float32 differs
# by ~1e-4 relative between the two executions' reduction orders (1e-15 in float64).
AGREEMENT = [(case, dtype) for case in sorted(CASES) for dtype in (torch.float32, torch.float64)
             if dtype == torch.float64 or not case.startswith("resnet")]


@pytest.mark.parametrize(("case", "dtype"), AGREEMENT)
@pytest.mark.parametrize("training", [False, True])
def test_vmap_and_loop_agree_on_outputs_gradients_and_buffers(case, training, dtype):
    torch.manual_seed(0)
    factory, shape = CASES[case]
    ens = Ensemble(lambda: factory().to(dtype), 3, seed=1).train(training)
    x = torch.randn(4, *shape, dtype=dtype)
    out_v, grads_v, buf_v = _loss_grads(ens, x, "vmap")
    out_l, grads_l, buf_l = _loss_grads(ens, x, "loop")
    assert out_v.shape[:2] == (3, 4)
    torch.testing.assert_close(out_v, out_l, atol=1e-5, rtol=1e-5)
    for k in grads_v:
        scale = max(1.0, grads_l[k].abs().max().item())
        torch.testing.assert_close(grads_v[k] / scale, grads_l[k] / scale, atol=1e-5, rtol=1e-5)
    for k in buf_v:  # BatchNorm statistics updated identically per member
        torch.testing.assert_close(buf_v[k], buf_l[k], atol=1e-6, rtol=1e-5)
    if training and case == "resnet20-bn":
        moved = [k for k in buf_v if k.endswith("running_mean")]
        assert moved and not torch.equal(buf_v[moved[0]], ens.member_buffers[moved[0]])


def test_members_match_their_own_modules_and_per_member_inputs():
    torch.manual_seed(0)
    factory, shape = CASES["mlp"]
    ens = Ensemble(factory, 4, seed=3).eval()
    xs = torch.randn(4, 5, *shape)
    for execution in ("vmap", "loop"):
        out = ens.apply(ens.params, xs, per_member_input=True, execution=execution)
        for m in range(4):
            torch.testing.assert_close(out[m], ens.member(m).eval()(xs[m]), atol=1e-6, rtol=1e-6)


def test_members_differ_and_sharded_init_matches_global_init():
    factory, _ = CASES["mlp"]
    _, full, _ = init_members(factory, 5, seed=7)
    _, shard, _ = init_members(factory, 2, seed=7, member_offset=3)
    for k in full:
        torch.testing.assert_close(full[k][3:5], shard[k], atol=0, rtol=0)
    first = next(iter(full.values()))
    assert not torch.equal(first[0], first[1])


def test_dropout_masks_differ_between_members_under_vmap():
    ens = Ensemble(lambda: nn.Sequential(nn.Linear(1, 1000), nn.Dropout(0.5)), 2,
                   execution="vmap").train()
    out = ens(torch.ones(1, 1))
    assert not torch.equal(out[0], out[1])
    assert 0.4 < (out[0] == 0).float().mean().item() < 0.6


@pytest.mark.parametrize("case", list(CASES))
def test_features_match_forward_hooks_on_each_member(case):
    torch.manual_seed(0)
    factory, shape = CASES[case]
    ens = Ensemble(factory, 2, seed=0).eval()
    layers = ens.module.feature_layers
    x = torch.randn(3, *shape)
    for execution in ("vmap", "loop"):
        ens.execution = execution
        out, feats = ens.features(x, layers)
        torch.testing.assert_close(out, ens(x))
        for m in range(2):
            member = ens.member(m).eval()
            seen = {}
            for name in layers:
                dict(member.named_modules())[name].register_forward_hook(
                    lambda _m, _i, o, name=name, seen=seen: seen.__setitem__(name, o))
            member(x)
            for name in layers:
                torch.testing.assert_close(feats[name][m], seen[name], atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="not a module"):
        ens.features(x, ["nope"])


def test_flatten_unflatten_roundtrip():
    factory, _ = CASES["mlp"]
    ens = Ensemble(factory, 3)
    flat = flatten_params(ens.params)
    assert flat.shape == (3, sum(v[0].numel() for v in ens.params.values()))
    back = unflatten_params(flat, ens.params)
    for k in back:
        torch.testing.assert_close(back[k], ens.params[k])


def test_pull_back_is_the_per_member_vector_jacobian_product():
    torch.manual_seed(0)
    ens = Ensemble(lambda: nn.Linear(3, 2), 2, seed=0)
    x = torch.randn(5, 3)
    out = ens(x)  # (M, B, 2): f_m(x) = x W_mᵀ + b_m
    v = torch.randn_like(out)
    grads = pull_back(out, ens.params, v)
    for m in range(2):  # closed form: ∂/∂W <v, xWᵀ> = vᵀ x ; ∂/∂b = Σ_b v
        torch.testing.assert_close(grads["weight"][m], v[m].T @ x)
        torch.testing.assert_close(grads["bias"][m], v[m].sum(0))


def test_weight_space_pull_back_of_flat_parameters_is_identity():
    ens = Ensemble(lambda: nn.Linear(3, 2), 2, seed=0)
    flat = flatten_params(ens.params)
    v = torch.randn_like(flat)
    grads = pull_back(flat, ens.params, v)
    torch.testing.assert_close(flatten_params(grads), v)


def test_auto_execution_times_both_and_leaves_no_trace():
    torch.manual_seed(0)
    factory, shape = CASES["resnet20-bn"]
    ens = Ensemble(factory, 2, seed=0, execution="auto").train()
    before = {k: v.clone() for k, v in ens.member_buffers.items()}
    x = torch.randn(4, *shape)
    rng = torch.get_rng_state()
    choice, times = ens.time_executions(x, repeats=1)
    assert choice in ("vmap", "loop") and times[choice] == min(times.values())
    assert torch.equal(torch.get_rng_state(), rng)
    for k in before:
        assert torch.equal(before[k], ens.member_buffers[k])


def test_bad_members_and_execution():
    with pytest.raises(UserError, match="members = 0"):
        Ensemble(lambda: nn.Linear(1, 1), 0)
    with pytest.raises(UserError, match="execution = 'fast'"):
        Ensemble(lambda: nn.Linear(1, 1), 1, execution="fast")


def test_auto_choice_is_remembered_so_runs_repeat(tmp_path, monkeypatch):
    monkeypatch.setenv("DIVERSE_CACHE_DIR", str(tmp_path))
    factory, shape = CASES["mlp"]
    x = torch.randn(4, *shape)
    first = Ensemble(factory, 2, execution="auto")
    choice = first.resolved_execution(x)
    cached = json.loads((tmp_path / "execution.json").read_text())
    assert list(cached.values()) == [choice]
    key = next(iter(cached))
    other = "loop" if choice == "vmap" else "vmap"
    (tmp_path / "execution.json").write_text(json.dumps({key: other}))
    assert Ensemble(factory, 2, execution="auto").resolved_execution(x) == other


class _WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("codes", torch.randn(4), persistent=False)

    def forward(self, x):
        return self.fc(x) + self.codes[:2]


def test_state_tensors_leave_out_derived_buffers_and_loading_ignores_old_extras():
    ens = Ensemble(_WithBuffers, members=2, seed=0)
    assert ens.derived_buffers == ("codes",)
    state = ens.state_tensors()
    assert set(state) == {"fc.weight", "fc.bias", "count"}
    other = Ensemble(_WithBuffers, members=2, seed=1)
    old = {**{k: v + 1 for k, v in state.items()}, "codes": torch.full((2, 4), 7.0)}
    other.load_state_tensors(old)  # an older checkpoint that saved the derived buffer
    for k in state:
        torch.testing.assert_close(other.state_tensors()[k], state[k] + 1)
    assert not torch.equal(other.member_buffers["codes"], torch.full((2, 4), 7.0))
    with pytest.raises(UserError, match="checkpoint tensor 'count' does not match"):
        other.load_state_tensors({k: v for k, v in state.items() if k != "count"})
