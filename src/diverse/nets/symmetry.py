"""Weight-space symmetry removal: canonical permutations and scalings.

Pure functions on stacked states ``{name: (M, *shape)}`` (parameters and buffers,
e.g. :meth:`diverse.nets.ensemble.Ensemble.state_tensors`); the model is only a skeleton
read for its structure. Every function returns a new dict and leaves its inputs as
they are. Reference: Laurent, Aldea & Franchi, "A symmetry-aware exploration of
Bayesian neural network posteriors" (ICLR 2024; code
o-laurent/bayes_posterior_symmetry_exploration).

Permutations (:func:`canonical_permutation`)
    Hidden units of a layer can be reordered, with the next layer's input dimension
    reordered alike, without changing the network function. The structure is a list
    of :class:`PermutableGroup` (:func:`permutation_groups`): which tensor dimensions
    are indexed by one set of hidden units. Groups are canonicalized in forward
    order: the layer's input dimension has already been permuted by the previous
    group, then its units are sorted by their incoming vector, **descending in
    lexicographic order**: the first incoming weight decides (the reference's key,
    ``W[i, 0]``, or ``W[c, 0, 0, 0]`` for a conv filter), exact ties are broken by
    the next entries of the incoming weight row, then the bias and the norm
    parameters/statistics of the unit. Only incoming-side tensors enter the key, so
    the key does not depend on the (not yet canonical) order of later layers.
    Units whose whole incoming side is identical compute the same activation and
    stay in an arbitrary (stable) order. The output layer and the inputs are never
    permuted.

    * Chains (:class:`~diverse.nets.models.MLP`, :class:`~diverse.nets.models.LeNet5`, plain
      ``nn.Sequential``): every Linear/Conv2d output except the last. At the
      conv -> flatten -> linear transition channel ``c`` owns the linear input
      columns ``c*P .. (c+1)*P - 1`` (``P`` spatial positions) and moves as a block.
    * CIFAR ResNets (:class:`~diverse.nets.models.CifarResNet`, ResNet-20/32/56) and
      :class:`~diverse.nets.models.PreActResNet`: only the hidden channels inside each
      block are canonicalized (``conv1`` outputs, the norm between, ``conv2`` input
      channels), as the reference code does. Residual-stream channels are left as
      they are: one stream permutation would have to be shared by the stem, every
      block and, through the zero-padding shortcuts, the next stages.
    * BatchNorm: weight, bias, running_mean and running_var follow the units.
      GroupNorm normalizes over contiguous channel groups, so permuting across
      groups would change the function: units are permuted only within their group
      (the group order itself is fixed).

Scalings (:func:`canonical_scaling`)
    For positively homogeneous activations (ReLU, LeakyReLU; max/average pooling
    and dropout commute with positive per-channel factors) hidden unit ``i`` of
    layer ``l`` can be scaled by ``e^{λ_{l,i}}`` if the next layer's matching input
    weights are scaled by ``e^{-λ_{l,i}}``:
    ``W_l ← diag(e^{λ_l}) W_l diag(e^{-λ_{l-1}})``, ``b_l ← e^{λ_l} ⊙ b_l``, with
    ``λ_0 = λ_L = 0`` (inputs and outputs fixed).

    * ``"min-mass"``: the scaling of least L2 mass on the orbit,
      ``min_λ Σ_l Σ_ij W²_{l,ij} e^{2(λ_{l,i} − λ_{l−1,j})} + Σ_l Σ_i b²_{l,i} e^{2λ_{l,i}}``
      (convex in ``λ``; for conv layers ``W²_{l,ij}`` sums the squared filter
      entries, after a flatten the squared columns of the channel block). Solved per
      member with SciPy's trust-region Newton-CG (``trust-ncg``) using the analytic
      gradient and Hessian-vector product.
    * ``"unit-norm"``: layer by layer, each hidden unit's incoming vector (weights and
      bias, after the previous layer's factors were pushed in) is scaled to norm 1
      and the inverse factor is pushed into the next layer.

    With BatchNorm the preceding layer is scale-invariant only up to the ``eps`` in
    the normalization and the running statistics, and GroupNorm likewise: the
    symmetry differs, so scaling supports MLP and LeNet-5 (any chain of
    Linear/Conv2d) without normalization layers, with ReLU or LeakyReLU.

:func:`remove_symmetries` applies the scaling first, then the permutation: the
canonical scaling is permutation-equivariant (the min-mass solution is unique and
unit-norm acts per unit), whereas the permutation's sort key (incoming weights)
changes under rescaling; sorting after scaling makes the result invariant to both.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor, nn

from diverse.errors import UserError
from diverse.nets.models import BasicBlock, CifarResNet, LeNet5, PreActBlock, PreActResNet

__all__ = [
    "SCALINGS",
    "Axis",
    "PermutableGroup",
    "apply_permutations",
    "canonical_permutation",
    "canonical_scaling",
    "permutation_groups",
    "remove_symmetries",
    "total_mass",
]

#: ``method`` values of :func:`canonical_scaling`; :func:`remove_symmetries` also takes "none".
SCALINGS: tuple[str, ...] = ("min-mass", "unit-norm")

# Modules that act per unit/channel (commute with any permutation of channels).
_PER_UNIT = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.ELU, nn.Softplus, nn.Sigmoid,
    nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
)
# Per-unit modules that also commute with positive per-unit factors.
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


# --------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class Axis:
    """One tensor dimension indexed by the units of a :class:`PermutableGroup`.

    Attributes:
        name: state key, e.g. ``"fc1.weight"``.
        dim: the dimension in ONE member's tensor (the stacked tensor has it at
            ``dim + 1``).
        block: consecutive entries per unit along ``dim``; ``P > 1`` at a
            conv -> flatten -> linear transition (channel ``c`` owns the columns
            ``c*P .. (c+1)*P - 1``). Default ``1``.
    """

    name: str
    dim: int
    block: int = 1


@dataclass(frozen=True)
class PermutableGroup:
    """A set of hidden units that may be reordered together.

    Attributes:
        size: number of units.
        key: the units' incoming-side axes in sort-key priority order; the first is
            the producing layer's weight (``dim = 0``).
        follow: the other axes permuted alike (the consuming layer's input dimension).
        groups: GroupNorm groups: units are permuted only within ``groups``
            contiguous chunks of ``size // groups``. Default ``1`` (free).
    """

    size: int
    key: tuple[Axis, ...]
    follow: tuple[Axis, ...] = ()
    groups: int = 1

    @property
    def axes(self) -> tuple[Axis, ...]:
        return self.key + self.follow


@dataclass(frozen=True)
class _Layer:
    """A Linear/Conv2d of a chain: ``name`` prefix, ``units`` outputs, input ``block``
    (spatial positions per previous channel after a flatten, else 1), the per-unit
    axes of the norm that follows it and its GroupNorm group count."""

    name: str
    units: int
    block: int
    bias: bool
    norm_axes: tuple[Axis, ...] = ()
    groups: int = 1


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


def _leaves(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """Modules of a chain in forward order (Sequentials and LeNet-5 unrolled)."""
    if isinstance(module, LeNet5):
        yield from _leaves(module.features, f"{prefix}features.")
        yield from _leaves(module.classifier, f"{prefix}classifier.")
        return
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{prefix}{name}.")
        return
    yield prefix.rstrip("."), module


def _norm_axes(prefix: str, norm: nn.Module) -> tuple[tuple[Axis, ...], int]:
    """Per-channel tensors of a norm layer (affine parameters, running statistics)."""
    if isinstance(norm, nn.Identity):
        return (), 1
    if not isinstance(norm, _NORMS):
        raise UserError(
            f"symmetry removal: norm layer {prefix!r} of type {type(norm).__name__} is not "
            f"supported; allowed: BatchNorm1d, BatchNorm2d, GroupNorm, Identity"
        )
    channels = norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features
    named = [*norm.named_parameters(recurse=False), *norm.named_buffers(recurse=False)]
    axes = tuple(
        Axis(f"{prefix}.{n}", 0)
        for n, t in named
        if t is not None and tuple(t.shape) == (channels,)
    )
    return axes, norm.num_groups if isinstance(norm, nn.GroupNorm) else 1


def _chain(model: nn.Module) -> tuple[list[_Layer], list[tuple[str, nn.Module]]]:
    """Linear/Conv2d layers of a chain model and its other (per-unit) modules."""
    layers: list[_Layer] = []
    others: list[tuple[str, nn.Module]] = []
    flattened = False
    for name, mod in _leaves(model, ""):
        if isinstance(mod, nn.Linear | nn.Conv2d):
            if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                raise UserError(
                    f"symmetry removal: grouped convolution {name!r} (groups={mod.groups}) "
                    f"is not supported; allowed: groups=1"
                )
            fan_in = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
            block = 1
            if layers:
                prev = layers[-1].units
                block = fan_in // prev if flattened else 1
                if fan_in != prev * block:
                    raise UserError(
                        f"symmetry removal: layer {name!r} takes {fan_in} inputs, which do not "
                        f"split into the {prev} units of {layers[-1].name!r}"
                    )
            units = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            layers.append(_Layer(name, units, block, mod.bias is not None))
            flattened = False
        elif isinstance(mod, _NORMS):
            if not layers or layers[-1].norm_axes:
                raise UserError(
                    f"symmetry removal: norm {name!r} must directly follow a Linear/Conv2d layer"
                )
            axes, groups = _norm_axes(name, mod)
            last = layers[-1]
            layers[-1] = _Layer(last.name, last.units, last.block, last.bias, axes, groups)
        elif isinstance(mod, nn.Flatten):
            flattened = True
        elif isinstance(mod, _PER_UNIT):
            others.append((name, mod))
        else:
            raise UserError(
                f"symmetry removal: module {name!r} of type {type(mod).__name__} in "
                f"{_model_name(model)} is not supported; allowed: Linear, Conv2d, norms, "
                f"Flatten and per-unit activations/pooling/dropout"
            )
    return layers, others


def _layer_key(layer: _Layer) -> tuple[Axis, ...]:
    bias = (Axis(f"{layer.name}.bias", 0),) if layer.bias else ()
    return (Axis(f"{layer.name}.weight", 0), *bias, *layer.norm_axes)


def _block_group(prefix: str, block: nn.Module) -> PermutableGroup:
    """Hidden channels of a residual block: conv1 outputs -> norm -> conv2 inputs."""
    norm_name = "norm1" if isinstance(block, BasicBlock) else "norm2"
    norm_axes, groups = _norm_axes(f"{prefix}.{norm_name}", getattr(block, norm_name))
    conv1 = block.conv1
    layer = _Layer(f"{prefix}.conv1", conv1.out_channels, 1, conv1.bias is not None, norm_axes)
    return PermutableGroup(
        size=conv1.out_channels,
        key=_layer_key(layer),
        follow=(Axis(f"{prefix}.conv2.weight", 1),),
        groups=groups,
    )


def permutation_groups(model: nn.Module) -> tuple[PermutableGroup, ...]:
    """The permutable hidden-unit groups of ``model``, in forward order.

    Supported: chains (:class:`~diverse.nets.models.MLP`, :class:`~diverse.nets.models.LinearModel`,
    :class:`~diverse.nets.models.LeNet5`, plain ``nn.Sequential`` of Linear/Conv2d/norm/
    Flatten/per-unit modules): every hidden layer; residual networks
    (:class:`~diverse.nets.models.CifarResNet`, :class:`~diverse.nets.models.PreActResNet`): the
    hidden channels inside each block. Anything else raises :class:`UserError`.
    """
    if isinstance(model, CifarResNet | PreActResNet):
        return tuple(
            _block_group(name, mod)
            for name, mod in model.named_modules()
            if isinstance(mod, BasicBlock | PreActBlock)
        )
    if not isinstance(model, nn.Sequential | LeNet5):
        raise UserError(
            f"symmetry removal does not support model {_model_name(model)}; allowed: MLP, "
            f"LinearModel, LeNet5, nn.Sequential chains, CifarResNet (resnet20/32/56), "
            f"PreActResNet"
        )
    layers, _ = _chain(model)
    return tuple(
        PermutableGroup(
            size=layer.units,
            key=_layer_key(layer),
            follow=(Axis(f"{nxt.name}.weight", 1, nxt.block),),
            groups=layer.groups,
        )
        for layer, nxt in zip(layers[:-1], layers[1:], strict=True)
    )


# --------------------------------------------------------------------------- permutation


def _members(state: Mapping[str, Tensor]) -> int:
    if not state:
        raise UserError("symmetry removal: the state is empty; pass stacked tensors (M, ...)")
    return next(iter(state.values())).shape[0]


def _check_axes(state: Mapping[str, Tensor], groups: Sequence[PermutableGroup]) -> None:
    for g in groups:
        for ax in g.axes:
            if ax.name not in state:
                raise UserError(
                    f"symmetry removal: the state has no tensor {ax.name!r} needed by the "
                    f"model; pass the stacked parameters and buffers of that model"
                )
            t = state[ax.name]
            if t.ndim <= ax.dim + 1 or t.shape[ax.dim + 1] != g.size * ax.block:
                raise UserError(
                    f"symmetry removal: tensor {ax.name!r} has shape {tuple(t.shape)}; "
                    f"expected (M, ...) with {g.size * ax.block} entries along dim {ax.dim + 1}"
                )


def _unit_rows(t: Tensor, ax: Axis, size: int) -> Tensor:
    """``(M, size, F)``: the entries of ``t`` belonging to each unit, flattened."""
    moved = t.movedim(ax.dim + 1, 1)
    return moved.reshape(moved.shape[0], size, -1)


def _lexsort_descending(key: Tensor) -> Tensor:
    """Indices sorting rows of ``key`` ``(..., n, F)`` lexicographically, descending.

    Fast path: one sort on the first column when it has no ties (the generic case);
    otherwise a stable radix sort from the last column to the first.
    """
    order = torch.sort(key[..., 0], dim=-1, descending=True, stable=True).indices
    first = torch.take_along_dim(key[..., 0], order, dim=-1)
    if not bool((first[..., 1:] == first[..., :-1]).any()):
        return order
    order = torch.arange(key.shape[-2], device=key.device).expand(key.shape[:-1]).contiguous()
    for col in range(key.shape[-1] - 1, -1, -1):
        values = torch.take_along_dim(key[..., col], order, dim=-1)
        step = torch.sort(values, dim=-1, descending=True, stable=True).indices
        order = torch.take_along_dim(order, step, dim=-1)
    return order


def _canonical_order(state: Mapping[str, Tensor], group: PermutableGroup) -> Tensor:
    """``(M, size)``: new position -> old unit index, sorted within GroupNorm groups."""
    key = torch.cat([_unit_rows(state[ax.name], ax, group.size) for ax in group.key], dim=-1)
    m, n, f = key.shape
    per = n // group.groups
    order = _lexsort_descending(key.reshape(m, group.groups, per, f))
    offsets = torch.arange(group.groups, device=key.device).view(1, -1, 1) * per
    return (order + offsets).reshape(m, n)


def _permute_axis(t: Tensor, ax: Axis, perm: Tensor) -> Tensor:
    m = perm.shape[0]
    index = perm
    if ax.block > 1:
        offsets = torch.arange(ax.block, device=perm.device)
        index = (perm.unsqueeze(-1) * ax.block + offsets).reshape(m, -1)
    shape = [m] + [1] * (t.ndim - 1)
    shape[ax.dim + 1] = index.shape[1]
    return torch.take_along_dim(t, index.reshape(shape), dim=ax.dim + 1)


def apply_permutations(
    state: Mapping[str, Tensor],
    groups: Sequence[PermutableGroup],
    perms: Sequence[Tensor],
) -> dict[str, Tensor]:
    """Reorder each group's units: unit ``perms[g][m, k]`` moves to position ``k``.

    Args:
        state: stacked tensors ``{name: (M, *shape)}``.
        groups: from :func:`permutation_groups`.
        perms: one ``(M, size)`` integer tensor per group, each row a permutation
            (within GroupNorm groups if ``groups > 1``; not checked).

    Returns:
        A new dict (every tensor a new one, detached); the network function is unchanged.
    """
    if len(perms) != len(groups):
        raise UserError(f"apply_permutations: {len(perms)} permutations for {len(groups)} groups")
    _check_axes(state, groups)
    out = {k: v.detach().clone() for k, v in state.items()}
    for g, perm in zip(groups, perms, strict=True):
        for ax in g.axes:
            out[ax.name] = _permute_axis(out[ax.name], ax, perm.to(out[ax.name].device))
    return out


def canonical_permutation(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Sort every permutable group of hidden units into canonical order.

    Args:
        model: the skeleton (structure only), e.g. ``Ensemble.module``.
        state: stacked parameters and buffers ``{name: (M, *shape)}``.

    Returns:
        A new dict with the same keys and shapes; per member, the same network
        function, and units of each group in descending lexicographic order of their
        incoming vector (see the module docstring). Two states differing only by
        hidden-unit permutations map to the same result.
    """
    groups = permutation_groups(model)
    _check_axes(state, groups)
    out = {k: v.detach().clone() for k, v in state.items()}
    with torch.no_grad():
        for g in groups:
            perm = _canonical_order(out, g)
            for ax in g.axes:
                out[ax.name] = _permute_axis(out[ax.name], ax, perm)
    return out


# --------------------------------------------------------------------------- scaling


def _scalable_layers(model: nn.Module) -> list[_Layer]:
    """The chain's Linear/Conv2d layers; refuses what has no plain scaling symmetry."""
    allowed = "MLP or LeNet5 (chains of Linear/Conv2d) without norm layers, ReLU/LeakyReLU"
    if not isinstance(model, nn.Sequential | LeNet5):
        raise UserError(
            f"canonical scaling does not support model {_model_name(model)}; allowed: {allowed}"
        )
    layers, others = _chain(model)
    for layer in layers:
        if layer.norm_axes or layer.groups != 1:
            raise UserError(
                f"canonical scaling: {_model_name(model)} has a norm layer after {layer.name!r}, "
                f"which changes the scaling symmetry; allowed: {allowed}"
            )
    for name, mod in others:
        if not isinstance(mod, _HOMOGENEOUS):
            raise UserError(
                f"canonical scaling: activation {name!r} ({type(mod).__name__}) is not "
                f"positively homogeneous; allowed: {allowed}"
            )
    return layers


def _blocks(w: Tensor, n_in: int) -> Tensor:
    """``(M, out, n_in, R)``: a Linear/Conv2d weight grouped by input unit."""
    return w.reshape(w.shape[0], w.shape[1], n_in, -1)


def _rescaled(
    state: Mapping[str, Tensor], layers: Sequence[_Layer], log_scales: Sequence[Tensor]
) -> dict[str, Tensor]:
    """``W_l ← diag(e^{λ_l}) W_l diag(e^{−λ_{l−1}})``, ``b_l ← e^{λ_l} b_l``.

    ``log_scales[l]`` is ``(M, units_l)`` for the hidden layers ``l = 0 .. L−2``.
    """
    out = {k: v.detach().clone() for k, v in state.items()}
    m = _members(state)
    for l, layer in enumerate(layers):
        w = out[f"{layer.name}.weight"]
        up = log_scales[l] if l < len(layers) - 1 else w.new_zeros(m, layer.units)
        down = log_scales[l - 1] if l > 0 else w.new_zeros(m, 1)
        factor = torch.exp(up.to(w.dtype)).view(m, -1, 1, 1) * torch.exp(
            -down.to(w.dtype)
        ).view(m, 1, -1, 1)
        out[f"{layer.name}.weight"] = (_blocks(w, down.shape[1]) * factor).reshape(w.shape)
        if layer.bias:
            b = out[f"{layer.name}.bias"]
            out[f"{layer.name}.bias"] = b * torch.exp(up.to(b.dtype))
    return out


def _unit_norm_scales(state: Mapping[str, Tensor], layers: Sequence[_Layer]) -> list[Tensor]:
    """Log-scales making every hidden unit's incoming vector (weights, bias) unit-norm."""
    m = _members(state)
    scales: list[Tensor] = []
    for l, layer in enumerate(layers[:-1]):
        w = state[f"{layer.name}.weight"].detach()
        down = scales[-1] if l > 0 else w.new_zeros(m, 1)
        sq = (_blocks(w, down.shape[1]).square() * torch.exp(-2 * down).view(m, 1, -1, 1))
        sq = sq.sum(dim=(2, 3))
        if layer.bias:
            sq = sq + state[f"{layer.name}.bias"].detach().square()
        norm = sq.sqrt()
        # A unit with no incoming mass keeps its scale (λ = 0).
        scales.append(torch.where(norm > 0, -torch.log(norm.clamp_min(1e-300)), 0.0))
    return scales


def _mass_terms(
    state: Mapping[str, Tensor], layers: Sequence[_Layer]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer ``S_l`` ``(M, out, n_in)`` (squared weights per unit pair, float64)
    and ``c_l`` ``(M, out)`` (squared biases); the first layer has ``n_in = 1``."""
    s_terms, c_terms = [], []
    for l, layer in enumerate(layers):
        w = state[f"{layer.name}.weight"].detach().to(torch.float64)
        n_in = layers[l - 1].units if l > 0 else 1
        s_terms.append(_blocks(w, n_in).square().sum(-1).cpu().numpy())
        if layer.bias:
            c_terms.append(state[f"{layer.name}.bias"].detach().to(torch.float64).square().cpu().numpy())
        else:
            c_terms.append(np.zeros((w.shape[0], layer.units)))
    return s_terms, c_terms


def _min_mass_member(s: Sequence[np.ndarray], c: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Solve the min-mass problem for one member; returns the hidden ``λ_l`` arrays.

    ``f(λ) = Σ_l Σ_ij S_l,ij e^{2(λ_l,i − λ_{l−1},j)} + Σ_l Σ_i c_l,i e^{2λ_l,i}``,
    normalized by ``f(0)``; gradient and Hessian-vector product are analytic.
    """
    n_layers = len(s)
    sizes = [t.shape[0] for t in s[:-1]]
    splits = np.cumsum(sizes)[:-1]
    total = float(sum(t.sum() for t in s) + sum(t.sum() for t in c))
    if total == 0.0 or not sizes:
        return [np.zeros(k) for k in sizes]
    s = [t / total for t in s]
    c = [t / total for t in c]

    def lams(x: np.ndarray) -> list[np.ndarray]:
        return [np.zeros(1), *np.split(x, splits), np.zeros(s[-1].shape[0])]

    def terms(x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        lam = lams(x)
        t = [s[l] * np.exp(2.0 * (lam[l + 1][:, None] - lam[l][None, :])) for l in range(n_layers)]
        u = [c[l] * np.exp(2.0 * lam[l + 1]) for l in range(n_layers)]
        return t, u

    def fun(x: np.ndarray) -> float:
        t, u = terms(x)
        return float(sum(a.sum() for a in t) + sum(a.sum() for a in u))

    def jac(x: np.ndarray) -> np.ndarray:
        t, u = terms(x)
        return np.concatenate(
            [2.0 * (t[k - 1].sum(1) + u[k - 1] - t[k].sum(0)) for k in range(1, n_layers)]
        )

    def hessp(x: np.ndarray, v: np.ndarray) -> np.ndarray:
        t, u = terms(x)
        vv = lams(v)
        d = [t[l] * (vv[l + 1][:, None] - vv[l][None, :]) for l in range(n_layers)]
        return np.concatenate(
            [4.0 * (d[k - 1].sum(1) + u[k - 1] * vv[k] - d[k].sum(0)) for k in range(1, n_layers)]
        )

    x0 = np.zeros(int(sum(sizes)))
    res = minimize(fun, x0, jac=jac, hessp=hessp, method="trust-ncg",
                   options={"gtol": 1e-12, "maxiter": 1000})
    # the objective is normalized to 1 at the start; 1e-6 is float64 precision for
    # trust-ncg here (an ordinary SWAG draw stopped at 1.75e-8)
    if not np.all(np.isfinite(res.x)) or np.linalg.norm(jac(res.x)) > 1e-6:
        raise RuntimeError(
            f"min-mass scaling did not converge: {res.message} (gradient norm "
            f"{np.linalg.norm(jac(res.x)):.3g}); a unit with zero incoming or outgoing "
            f"weights has no finite minimum"
        )
    return np.split(res.x, splits)


def _min_mass_scales(state: Mapping[str, Tensor], layers: Sequence[_Layer]) -> list[Tensor]:
    s_terms, c_terms = _mass_terms(state, layers)
    m = _members(state)
    solved = [
        _min_mass_member([t[i] for t in s_terms], [t[i] for t in c_terms]) for i in range(m)
    ]
    device = next(iter(state.values())).device
    return [
        torch.as_tensor(np.stack([solved[i][l] for i in range(m)]), device=device)
        for l in range(len(layers) - 1)
    ]


def canonical_scaling(
    model: nn.Module, state: Mapping[str, Tensor], method: str = "min-mass"
) -> dict[str, Tensor]:
    """Remove the positive-scaling symmetry of a ReLU/LeakyReLU chain network.

    Args:
        model: the skeleton: an MLP or LeNet-5 (a chain of Linear/Conv2d) without norm
            layers, whose activations are ReLU or LeakyReLU.
        state: stacked parameters ``{name: (M, *shape)}`` (other keys pass through).
        method: ``"min-mass"`` (default; least total L2 mass on the scaling orbit,
            Laurent et al. 2024 §3.2) or ``"unit-norm"`` (unit incoming norm per
            hidden unit, factor pushed to the next layer).

    Returns:
        A new dict: ``W_l ← diag(e^{λ_l}) W_l diag(e^{−λ_{l−1}})``, ``b_l ← e^{λ_l} b_l``
        with the method's log-scales ``λ`` (``λ_0 = λ_L = 0``); per member, the same
        network function. States differing only by positive rescalings of hidden units
        map to the same result.
    """
    if method not in SCALINGS:
        raise UserError(f"scaling method {method!r} is unknown; allowed: {', '.join(SCALINGS)}")
    layers = _scalable_layers(model)
    for layer in layers:
        for name in (f"{layer.name}.weight", *((f"{layer.name}.bias",) if layer.bias else ())):
            if name not in state:
                raise UserError(
                    f"canonical scaling: the state has no tensor {name!r} needed by the model"
                )
    with torch.no_grad():
        if method == "min-mass":
            scales = _min_mass_scales(state, layers)
        else:
            scales = _unit_norm_scales(state, layers)
        return _rescaled(state, layers, scales)


def remove_symmetries(
    model: nn.Module, state: Mapping[str, Tensor], scaling: str = "min-mass"
) -> dict[str, Tensor]:
    """Canonical representative under scalings and permutations: scaling, then sorting.

    The scaling comes first because it is permutation-equivariant while the
    permutation's sort key is not scale-invariant (module docstring). Use
    ``scaling="none"`` for networks with norm layers or residual connections
    (permutation only).

    Args:
        model: the skeleton.
        state: stacked parameters and buffers ``{name: (M, *shape)}``.
        scaling: ``"min-mass"`` (default), ``"unit-norm"`` or ``"none"``.
    """
    allowed = (*SCALINGS, "none")
    if scaling not in allowed:
        raise UserError(f"scaling {scaling!r} is unknown; allowed: {', '.join(allowed)}")
    if scaling != "none":
        state = canonical_scaling(model, state, scaling)
    return canonical_permutation(model, state)


def total_mass(state: Mapping[str, Tensor], model: nn.Module | None = None) -> Tensor:
    """``(M,)``: the L2 mass ``Σ w²`` of each member.

    Sums every floating-point tensor of ``state``, or only ``model``'s parameters
    when ``model`` is given (so BatchNorm running statistics in a full state do not
    count). Min-mass scaling minimizes exactly this quantity over the scaling orbit.
    Differentiable (not detached), e.g. for a gradient check or a penalty.
    """
    names = set(dict(model.named_parameters())) if model is not None else None
    tensors = [
        v.reshape(v.shape[0], -1)
        for k, v in state.items()
        if v.is_floating_point() and (names is None or k in names)
    ]
    if not tensors:
        raise UserError("total_mass: the state holds no floating-point parameters")
    return sum(t.square().sum(1) for t in tensors)
