"""Members of different architectures: groups, each stacked and vectorized.

``Heterogeneous([(make_resnet20, 2), (make_lenet5, 3)])`` describes 5 members: two of one
architecture, three of another. :class:`HeteroEnsemble` holds one
:class:`~diverse.nets.ensemble.Ensemble` per group and looks like one ensemble to the
methods that compare members through what every architecture has in common — outputs
``(M, B, K)``, input gradients and features (deep ensembles, f-SVGD, f-WGD, FoRDE,
HE-CKA): the member parameters are the groups' parameters under ``"group<i>/<name>"``
(stacked ``(M_i, ...)`` per group), a forward runs every group on the batch and
concatenates the member axes in group order.

Weight-space methods refuse it: members of different architectures have no common
weight space, so a kernel between their weights is undefined (D'Angelo & Fortuin 2021 make the same
point for function-space repulsion, which needs none).

Features of a layer whose shape differs between groups are flattened to ``(M, B, D_i)``
and zero-padded to the largest ``D``: every kernel of features — linear Gram matrices
``X Xᵀ`` and squared distances alike — is unchanged by zero padding, so the feature
kernels (CKA, HE-CKA) compare the groups exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from diverse.errors import UserError
from diverse.nets.ensemble import Ensemble, Params
from diverse.nets.forms import MemberForm


@dataclass(frozen=True)
class Heterogeneous:
    """The groups of a heterogeneous ensemble: ``[(factory, count), ...]``."""

    groups: tuple[tuple[Callable[[], nn.Module], int], ...]

    def __init__(self, groups: Sequence[tuple[Callable[[], nn.Module], int]]) -> None:
        checked = []
        for item in groups:
            if (not isinstance(item, tuple | list) or len(item) != 2
                    or not isinstance(item[1], int) or item[1] < 1):
                raise UserError(f"heterogeneous group {item!r}: expected (factory, count >= 1)")
            checked.append((item[0], item[1]))
        if len(checked) < 1:
            raise UserError("heterogeneous: give at least one (factory, count) group")
        object.__setattr__(self, "groups", tuple(checked))

    @property
    def members(self) -> int:
        return sum(count for _f, count in self.groups)


@dataclass(frozen=True)
class HeterogeneousForm(MemberForm):
    """The form record of a :class:`HeteroEnsemble` (the method table's ``forms`` name)."""

    name: ClassVar[str] = "heterogeneous"


def _prefix(i: int) -> str:
    return f"group{i}/"


def _split(tensors: Mapping[str, Tensor], i: int) -> Params:
    prefix = _prefix(i)
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _join(parts: Sequence[Mapping[str, Tensor]]) -> Params:
    return {_prefix(i) + k: v for i, part in enumerate(parts) for k, v in part.items()}


class HeteroEnsemble(nn.Module):
    """M members in groups of one architecture each (see the module docstring).

    Args:
        groups: the groups' :class:`~diverse.nets.ensemble.Ensemble` objects, in order.
        spec: the :class:`Heterogeneous` they were built from (saved runs rebuild it).
    """

    def __init__(self, groups: Sequence[Ensemble], spec: Heterogeneous) -> None:
        super().__init__()
        self.groups = nn.ModuleList(groups)
        self.members = sum(g.members for g in groups)
        self.form = HeterogeneousForm()
        self.seed = groups[0].seed
        self.member_offset = 0
        self.base_factory = spec
        self.built_for: str | None = None
        self.generates_members = False
        self.derived_buffers: tuple[str, ...] = ()

    # ------------------------------------------------------------- the one-ensemble view
    @property
    def configured(self) -> tuple[str, bool] | None:
        return self.groups[0].configured

    @configured.setter
    def configured(self, value: tuple[str, bool] | None) -> None:
        for g in self.groups:
            g.configured = value

    @property
    def params(self) -> Params:
        return _join([g.params for g in self.groups])

    @property
    def member_buffers(self) -> Params:
        return _join([g.member_buffers for g in self.groups])

    @property
    def shared(self) -> Params:
        return _join([g.shared for g in self.groups])

    @property
    def shared_trainable(self) -> Params:
        return {}

    @property
    def trainable(self) -> Params:
        return self.params

    @property
    def module(self) -> nn.Module:
        """The first group's member module (layer names are checked in every group)."""
        return self.groups[0].module

    @property
    def device(self) -> torch.device:
        return self.groups[0].device

    @property
    def execution(self) -> str:
        return ",".join(g.execution for g in self.groups)

    @execution.setter
    def execution(self, value: str) -> None:
        parts = value.split(",")
        if len(parts) == 1:
            parts = parts * len(self.groups)
        for g, mode in zip(self.groups, parts, strict=True):
            g.execution = mode

    def resolved_execution(self, x: Tensor | None = None, per_member_input: bool = False) -> str:
        for g in self.groups:
            g.resolved_execution(x, per_member_input)
        return self.execution

    def _sizes(self, params: Mapping[str, Tensor]) -> list[int]:
        return [next(iter(_split(params, i).values())).shape[0] for i in range(len(self.groups))]

    # ------------------------------------------------------------------ forward
    def apply(self, params: Mapping[str, Tensor], x: Tensor, *,
              buffers: Mapping[str, Tensor] | None = None,
              shared: Mapping[str, Tensor] | None = None, per_member_input: bool = False,
              execution: str | None = None) -> Tensor:
        """Outputs ``(M, B, ...)``: every group's members, in group order."""
        outs, start = [], 0
        for i, (g, size) in enumerate(zip(self.groups, self._sizes(params), strict=True)):
            xi = x[start:start + size] if per_member_input else x
            outs.append(g.apply(_split(params, i), xi,
                                buffers=None if buffers is None else _split(buffers, i),
                                per_member_input=per_member_input, execution=execution))
            start += size
        return torch.cat(outs)

    def forward(self, x: Tensor, *, per_member_input: bool = False) -> Tensor:
        return self.apply(self.params, x, per_member_input=per_member_input)

    def features(self, x: Tensor, layers: Sequence[str], *,
                 params: Mapping[str, Tensor] | None = None, per_member_input: bool = False
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        """Outputs ``(M, B, ...)`` and features ``{layer: (M, B, ...)}``, zero-padded
        ``(M, B, D)`` where the groups' shapes differ (module docstring)."""
        params = self.params if params is None else params
        outs, feats, start = [], [], 0
        for i, (g, size) in enumerate(zip(self.groups, self._sizes(params), strict=True)):
            xi = x[start:start + size] if per_member_input else x
            out, f = g.features(xi, layers, params=_split(params, i),
                                per_member_input=per_member_input)
            outs.append(out)
            feats.append(f)
            start += size
        joined = {}
        for layer in layers:
            parts = [f[layer] for f in feats]
            if len({tuple(p.shape[1:]) for p in parts}) > 1:
                parts = [p.reshape(p.shape[0], p.shape[1], -1) for p in parts]
                width = max(p.shape[-1] for p in parts)
                parts = [nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts]
            joined[layer] = torch.cat(parts)
        return torch.cat(outs), joined

    # ------------------------------------------------------------ modes, state
    def train(self, mode: bool = True) -> HeteroEnsemble:
        super().train(mode)
        return self

    def member(self, m: int) -> nn.Module:
        for g in self.groups:
            if m < g.members:
                return g.member(m)
            m -= g.members
        raise IndexError(f"member {m} of {self.members}")

    def plain_model(self) -> nn.Module:
        raise UserError("a heterogeneous ensemble has no single plain model (weight samples "
                        "need one architecture)")

    def state_tensors(self) -> dict[str, Tensor]:
        return _join([g.state_tensors() for g in self.groups])

    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        for i, g in enumerate(self.groups):
            g.load_state_tensors(_split(tensors, i))

    def frozen_fingerprint(self) -> str | None:
        prints = [g.frozen_fingerprint() for g in self.groups]
        if not any(prints):
            return None
        return hashlib.sha256("|".join(p or "" for p in prints).encode()).hexdigest()


@dataclass(frozen=True)
class GroupSamples:
    """The weight samples of a heterogeneous ensemble: one
    :class:`~diverse.nets.samples.Samples` per group (each of its own architecture),
    every group with the same draws per member."""

    groups: tuple[Any, ...]

    @property
    def count(self) -> int:
        return sum(s.count for s in self.groups)

    @property
    def members(self) -> int:
        return sum(s.members for s in self.groups)

    @property
    def draws(self) -> int:
        return self.groups[0].draws

    def to(self, device: torch.device | str) -> GroupSamples:
        return GroupSamples(tuple(s.to(device) for s in self.groups))


def split_groups(tensors: Mapping[str, Tensor], groups: int) -> list[Params]:
    """``{"group<i>/<name>": t}`` → one ``{name: t}`` per group (the same tensors)."""
    return [_split(tensors, i) for i in range(groups)]


def join_groups(parts: Sequence[Mapping[str, Tensor]]) -> Params:
    """The inverse of :func:`split_groups`."""
    return _join(parts)


def interleave_draws(parts: Sequence[Tensor], draws: int) -> Tensor:
    """Per-group draw-major predictions ``(D·M_i, ...)`` → one draw-major ``(D·M, ...)``:
    draw d holds every member, in group order (:mod:`diverse.nets.samples`)."""
    shaped = [p.reshape(draws, p.shape[0] // draws, *p.shape[1:]) for p in parts]
    joined = torch.cat(shaped, dim=1)
    return joined.reshape(-1, *joined.shape[2:])


def build_heterogeneous(spec: Heterogeneous, make_group: Callable[..., Ensemble],
                        members: int, **kwargs: Any) -> HeteroEnsemble:
    """The :class:`HeteroEnsemble` of ``spec``: ``make_group(factory, count, member_offset=...,
    **kwargs)`` builds each group (a method's :meth:`~diverse.methods.catalog.Method.ensemble`,
    so its model wrapper applies); members get global indices in group order."""
    if members != spec.members:
        raise UserError(f"ensemble members = {members}: the heterogeneous groups hold "
                        f"{spec.members} ({' + '.join(str(c) for _f, c in spec.groups)})")
    groups, offset = [], 0
    for factory, count in spec.groups:
        groups.append(make_group(factory, count, member_offset=offset, **kwargs))
        offset += count
    return HeteroEnsemble(groups, spec)
