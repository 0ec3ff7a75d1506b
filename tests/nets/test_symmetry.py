"""Permutation and scaling canonicalization (seed 004) on MLP, LeNet-5 and ResNet-20."""

import copy

import pytest
import torch
from scipy.optimize import minimize
from torch import nn
from torch.func import functional_call

from diverse.errors import UserError
from diverse.nets.ensemble import init_members
from diverse.nets.models import LeNetConfig, MLPConfig, ResNetConfig, build_model
from diverse.nets.symmetry import (
    apply_permutations,
    canonical_permutation,
    canonical_scaling,
    permutation_groups,
    remove_symmetries,
    total_mass,
)

M = 3
# Linear/Conv2d layers of the chain models in forward order: (prefix, input block).
MLP_LAYERS = [("fc1", 1), ("fc2", 1), ("out", 1)]
LENET_LAYERS = [
    ("features.conv1", 1), ("features.conv2", 1), ("classifier.fc1", 25),
    ("classifier.fc2", 1), ("classifier.fc3", 1),
]


def _randomize(state, seed):
    """Non-trivial biases, norm parameters and running statistics; no zero weights."""
    g = torch.Generator().manual_seed(seed)

    def noise(v, scale):
        return scale * torch.randn(v.shape, generator=g, dtype=v.dtype)

    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=g, dtype=v.dtype)
        elif k.endswith(("bias", "running_mean")):
            out[k] = noise(v, 0.3)
        elif "norm" in k:  # norm weight
            out[k] = 1.0 + noise(v, 0.3)
        elif (v == 0).any():  # zero-initialized conv2 of the norm-free ResNet
            out[k] = noise(v, 0.1)
        else:
            out[k] = v.clone()
    return out


def _setup(cfg, shape, members=M, seed=0):
    model, params, buffers = init_members(
        lambda: build_model(cfg, shape, 10).double(), members, seed
    )
    model.eval()
    return model, _randomize({**params, **buffers}, seed + 1)


def _mlp(activation="relu"):
    return _setup(MLPConfig(hidden=(12, 9), activation=activation), (1, 4, 4))


def _lenet():
    return _setup(LeNetConfig(), (1, 28, 28))


def _resnet(norm):
    return _setup(ResNetConfig(norm=norm), (3, 32, 32), members=2)


def _inputs(model, seed=0):
    shape = (3, 32, 32) if "ResNet" in type(model).__name__ else (
        (1, 28, 28) if "LeNet" in type(model).__name__ else (1, 4, 4)
    )
    return torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _outputs(model, state, x):
    """Per-member forward (the oracle: one functional_call per member)."""
    count = next(iter(state.values())).shape[0]
    return torch.stack(
        [functional_call(model, {k: v[m] for k, v in state.items()}, (x,)) for m in range(count)]
    )


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _chain_transform(state, layers, perms, log_scales):
    """Oracle: permute hidden unit rows and rescale them by e^λ, and apply the inverse
    to the next layer's input columns (blocks of ``block`` columns after a flatten),
    member by member with plain indexing. Differentiable in ``log_scales``."""
    out = dict(state)
    for i, (name, block) in enumerate(layers):
        ws, bs = [], []
        for m in range(state[f"{name}.weight"].shape[0]):
            w, b = state[f"{name}.weight"][m], state[f"{name}.bias"][m]
            if i > 0:
                prev, lam = perms[i - 1][m], log_scales[i - 1][m]
                cols = (prev[:, None] * block + torch.arange(block)).reshape(-1)
                w = w[:, cols] * torch.exp(-lam).repeat_interleave(block).view(
                    1, -1, *[1] * (w.ndim - 2)
                )
            if i < len(layers) - 1:
                p, lam = perms[i][m], log_scales[i][m]
                w = w[p] * torch.exp(lam).view(-1, *[1] * (w.ndim - 1))
                b = b[p] * torch.exp(lam)
            ws.append(w)
            bs.append(b)
        out[f"{name}.weight"], out[f"{name}.bias"] = torch.stack(ws), torch.stack(bs)
    return out


def _random_transform(state, layers, seed, scale=True):
    g = torch.Generator().manual_seed(seed)
    widths = [state[f"{name}.bias"].shape[1] for name, _ in layers[:-1]]
    perms = [torch.stack([torch.randperm(n, generator=g) for _ in range(M)]) for n in widths]
    low, high = torch.log(torch.tensor(0.2)), torch.log(torch.tensor(5.0))
    lams = [
        (low + (high - low) * torch.rand(M, n, generator=g, dtype=torch.float64))
        * float(scale)
        for n in widths
    ]
    return _chain_transform(state, layers, perms, lams)


def _random_group_perms(state, groups, seed):
    """Random permutations, within GroupNorm groups when a group has them."""
    g = torch.Generator().manual_seed(seed)
    count = next(iter(state.values())).shape[0]
    perms = []
    for grp in groups:
        per = grp.size // grp.groups
        rows = [
            torch.cat([torch.randperm(per, generator=g) + j * per for j in range(grp.groups)])
            for _ in range(count)
        ]
        perms.append(torch.stack(rows))
    return perms


# --------------------------------------------------------------------------- (a) function kept


@pytest.mark.parametrize("kind", ["mlp", "lenet", "batch", "group", "none"])
def test_permutation_keeps_the_function(kind):
    model, state = _mlp() if kind == "mlp" else _lenet() if kind == "lenet" else _resnet(kind)
    before = {k: v.clone() for k, v in state.items()}
    x = _inputs(model)
    canon = canonical_permutation(model, state)
    assert _max_diff(state, before) == 0.0  # inputs untouched
    assert set(canon) == set(state)
    assert (_outputs(model, canon, x) - _outputs(model, state, x)).abs().max() <= 1e-5
    assert _max_diff(canon, state) > 1e-2  # it did reorder something


@pytest.mark.parametrize("kind", ["mlp", "lenet"])
@pytest.mark.parametrize("method", ["min-mass", "unit-norm"])
def test_scaling_and_removal_keep_the_function(kind, method):
    model, state = _mlp() if kind == "mlp" else _lenet()
    x = _inputs(model)
    ref = _outputs(model, state, x)
    scaled = canonical_scaling(model, state, method)
    assert (_outputs(model, scaled, x) - ref).abs().max() <= 1e-5
    assert _max_diff(scaled, state) > 1e-2
    removed = remove_symmetries(model, state, scaling=method)
    assert (_outputs(model, removed, x) - ref).abs().max() <= 1e-5


# --------------------------------------------------------------------------- (b) invariance


@pytest.mark.parametrize("kind", ["mlp", "lenet"])
@pytest.mark.parametrize("method", ["min-mass", "unit-norm"])
def test_permuted_rescaled_copy_has_the_same_canonical_form(kind, method):
    model, state = _mlp() if kind == "mlp" else _lenet()
    layers = MLP_LAYERS if kind == "mlp" else LENET_LAYERS
    copy_ = _random_transform(state, layers, seed=7)
    x = _inputs(model)
    assert (_outputs(model, copy_, x) - _outputs(model, state, x)).abs().max() <= 1e-5
    assert _max_diff(copy_, state) > 0.1
    a = remove_symmetries(model, state, scaling=method)
    b = remove_symmetries(model, copy_, scaling=method)
    assert _max_diff(a, b) <= 1e-5
    # Permutation alone: a permuted (not rescaled) copy, through the library's own
    # apply_permutations and through the oracle, canonicalizes identically.
    perm_only = _random_transform(state, layers, seed=8, scale=False)
    assert _max_diff(canonical_permutation(model, perm_only),
                     canonical_permutation(model, state)) == 0.0


def test_canonical_order_is_descending_first_weight_with_ties_broken():
    model, state = _mlp()
    state["fc1.weight"][:, 3, 0] = state["fc1.weight"][:, 5, 0]  # a tie in the first weight
    canon = canonical_permutation(model, state)
    for name in ("fc1.weight", "fc2.weight"):
        first = canon[name][:, :, 0]
        assert (first[:, :-1] >= first[:, 1:]).all()
    tied = canon["fc1.weight"][:, :, 0]
    for m in range(M):  # the tied pair is ordered by the second weight, descending
        where = (tied[m] == state["fc1.weight"][m, 5, 0]).nonzero().flatten()
        assert len(where) == 2
        rows = canon["fc1.weight"][m, where]
        assert rows[0, 1] > rows[1, 1]
    copy_ = _random_transform(state, MLP_LAYERS, seed=3, scale=False)
    assert _max_diff(canonical_permutation(model, copy_), canon) == 0.0


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_resnet_hidden_channels_canonical(norm):
    model, state = _resnet(norm)
    groups = permutation_groups(model)
    assert len(groups) == 9  # one hidden-channel group per basic block
    assert groups[0].key[0].name == "layer1.0.conv1.weight"
    assert groups[0].follow[0].name == "layer1.0.conv2.weight"
    assert {ax.name for ax in groups[0].key} >= {"layer1.0.norm1.weight", "layer1.0.norm1.bias"}
    if norm == "batch":
        assert {ax.name for ax in groups[0].key} >= {
            "layer1.0.norm1.running_mean", "layer1.0.norm1.running_var"
        }
    else:
        assert [g.groups for g in groups] == [8] * 9
    copy_ = apply_permutations(state, groups, _random_group_perms(state, groups, seed=5))
    x = _inputs(model)
    assert (_outputs(model, copy_, x) - _outputs(model, state, x)).abs().max() <= 1e-5
    assert _max_diff(copy_, state) > 0.1
    assert _max_diff(canonical_permutation(model, copy_),
                     canonical_permutation(model, state)) == 0.0
    assert _max_diff(remove_symmetries(model, copy_, scaling="none"),
                     canonical_permutation(model, state)) == 0.0


def test_group_norm_permutes_within_groups_only():
    model, state = _resnet("group")
    canon = canonical_permutation(model, state)
    w, c = state["layer3.0.conv1.weight"], canon["layer3.0.conv1.weight"]  # 64 ch, 8 groups
    for m in range(2):
        for j in range(8):
            before = w[m, 8 * j : 8 * j + 8].flatten(1)
            after = c[m, 8 * j : 8 * j + 8].flatten(1)
            assert sorted(after[:, 0].tolist()) == sorted(before[:, 0].tolist())
            assert (after[:-1, 0] >= after[1:, 0]).all()


# --------------------------------------------------------------------------- (c, d) scaling


def _hidden_log_scale_grad(state, layers):
    """∂ mass / ∂λ at λ = 0 by autograd through the oracle transform."""
    widths = [state[f"{name}.bias"].shape[1] for name, _ in layers[:-1]]
    lams = [torch.zeros(M, n, dtype=torch.float64, requires_grad=True) for n in widths]
    ident = [torch.arange(n).expand(M, n) for n in widths]
    mass = total_mass(_chain_transform(state, layers, ident, lams)).sum()
    return torch.cat([g.flatten() for g in torch.autograd.grad(mass, lams)])


@pytest.mark.parametrize("kind", ["mlp", "lenet"])
def test_min_mass_is_a_stationary_minimum(kind):
    model, state = _mlp() if kind == "mlp" else _lenet()
    layers = MLP_LAYERS if kind == "mlp" else LENET_LAYERS
    best = canonical_scaling(model, state, "min-mass")
    mass0, mass = total_mass(state, model), total_mass(best, model)
    assert (mass <= mass0).all() and (mass < 0.99 * mass0).all()
    assert (mass <= total_mass(canonical_scaling(model, state, "unit-norm"), model)).all()
    grad0 = _hidden_log_scale_grad(state, layers)
    assert grad0.abs().max() > 1.0  # the start is not stationary
    assert _hidden_log_scale_grad(best, layers).abs().max() <= 1e-6 * mass.max()
    # Idempotent: the minimum of the minimum is itself.
    assert _max_diff(canonical_scaling(model, best, "min-mass"), best) <= 1e-7


def test_min_mass_matches_an_independent_solve():
    """L-BFGS-B on the mass of the oracle transform (autograd gradient) for member 0."""
    model, state = _setup(MLPConfig(hidden=(5, 4)), (3,), members=M)
    widths = [5, 4]
    layers = MLP_LAYERS

    def fun(x):
        t = torch.as_tensor(x).reshape(1, -1).expand(M, -1).clone().requires_grad_(True)
        lams = [t[:, :5], t[:, 5:]]
        ident = [torch.arange(n).expand(M, n) for n in widths]
        mass = total_mass(_chain_transform(state, layers, ident, lams))[0]
        (grad,) = torch.autograd.grad(mass, t)
        return mass.item(), grad[0].numpy()

    res = minimize(fun, [0.0] * 9, jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000})
    best = canonical_scaling(model, state, "min-mass")
    assert total_mass(best)[0].item() == pytest.approx(res.fun, rel=1e-9)
    want = torch.exp(torch.as_tensor(res.x[:5]))[:, None] * state["fc1.weight"][0]
    torch.testing.assert_close(best["fc1.weight"][0], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "lenet"])
def test_unit_norm_gives_unit_incoming_norms(kind):
    model, state = _mlp("leaky_relu") if kind == "mlp" else _lenet()
    layers = MLP_LAYERS if kind == "mlp" else LENET_LAYERS
    scaled = canonical_scaling(model, state, "unit-norm")
    for name, _ in layers[:-1]:
        w, b = scaled[f"{name}.weight"], scaled[f"{name}.bias"]
        norm = (w.flatten(2).square().sum(-1) + b.square()).sqrt()
        torch.testing.assert_close(norm, torch.ones_like(norm), rtol=1e-10, atol=1e-10)
    name = layers[-1][0]  # the output layer absorbed the factors: not unit-norm
    assert (scaled[f"{name}.weight"] - state[f"{name}.weight"]).abs().max() > 1e-2


def test_total_mass():
    state = {"a": torch.tensor([[1.0, 2.0], [0.0, 3.0]]),
             "b": torch.ones(2, 2, 2), "n": torch.tensor([4, 5])}
    torch.testing.assert_close(total_mass(state), torch.tensor([9.0, 13.0]))
    model, full = _resnet("batch")
    params = {k: v for k, v in full.items() if k in dict(model.named_parameters())}
    torch.testing.assert_close(total_mass(full, model), total_mass(params))
    assert (total_mass(full) > total_mass(full, model)).all()  # running stats excluded


# --------------------------------------------------------------------------- (e) errors


def test_unsupported_combinations_raise_user_error():
    resnet, rstate = _resnet("batch")
    with pytest.raises(UserError, match="CifarResNet"):
        canonical_scaling(resnet, rstate)
    with pytest.raises(UserError, match="CifarResNet"):
        remove_symmetries(resnet, rstate, scaling="unit-norm")
    tanh, tstate = _mlp("tanh")
    with pytest.raises(UserError, match="Tanh"):
        canonical_scaling(tanh, tstate, "min-mass")
    mlp, state = _mlp()
    with pytest.raises(UserError, match="'l2'"):
        canonical_scaling(mlp, state, "l2")
    with pytest.raises(UserError, match="'affine'"):
        remove_symmetries(mlp, state, scaling="affine")
    missing = {k: v for k, v in state.items() if k != "fc2.weight"}
    with pytest.raises(UserError, match="fc2.weight"):
        canonical_permutation(mlp, missing)
    normed = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    _, p, b = init_members(lambda: copy.deepcopy(normed), 2, 0)
    with pytest.raises(UserError, match="norm"):
        canonical_scaling(normed, {**p, **b})
    assert len(permutation_groups(normed)) == 1  # permutation is fine with BatchNorm1d
    with pytest.raises(UserError, match="LSTM"):
        permutation_groups(nn.LSTM(3, 4))
    with pytest.raises(UserError, match="MultiheadAttention"):
        permutation_groups(nn.Sequential(nn.Linear(3, 4), nn.MultiheadAttention(4, 1)))
