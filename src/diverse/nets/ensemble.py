"""An ensemble of M members of one architecture, with stacked parameters.

Every parameter and buffer of the members is stored once, stacked with a
leading member axis: a layer weight of shape ``(O, I)`` becomes ``(M, O, I)``.
One forward maps an input ``(B, ...)`` (shared by all members) or
``(M, B, ...)`` (one batch per member) to outputs ``(M, B, ...)``; the member
axis is never folded into the batch.

Two interchangeable executions give the same numbers:

* ``"vmap"`` — ``torch.func.functional_call`` under ``torch.func.vmap`` with
  ``randomness="different"`` (each member draws its own dropout masks);
  stacked BatchNorm running statistics are updated in place per member.
* ``"loop"`` — a Python loop over members, each a ``functional_call`` on views
  of the stacked tensors (so BatchNorm statistics update the same storage).

``"auto"`` times both on a sample batch (forward + backward) and keeps the
faster: on a 2-core CPU a loop wins for conv nets, on a GPU vmap wins.

The pure-function view (:meth:`Ensemble.apply`) takes the stacked parameters
explicitly, which is what later methods need: per-member gradients of a sum of
member losses, embeddings of the members (flattened weights, outputs on a
batch, input gradients, features at named layers) and the pull-back of an
update in an embedding space to the weights by a vector-Jacobian product
(:func:`pull_back`). Members carry global indices (``member_offset``) and are
initialized from ``(seed, global index)`` alone, so a process holding members
``[a, b)`` of a sharded ensemble builds exactly those members.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from diverse.errors import UserError
from diverse.nets.forms import PEFT_PREFIX, Full, build_members
from diverse.nets.forms import member_seed as member_seed  # (its old home: re-exported)

EXECUTIONS = ("auto", "vmap", "loop")

Params = dict[str, Tensor]


def init_members(
    factory: Callable[[], nn.Module], members: int, seed: int, member_offset: int = 0
) -> tuple[nn.Module, Params, Params]:
    """Build members ``member_offset .. member_offset+members-1`` and stack them.

    Returns ``(skeleton, params, buffers)``: the skeleton is member 0's module
    (used only for its structure), ``params[name]`` is ``(M, *shape)``.
    """
    modules = []
    for m in range(members):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member_seed(seed, member_offset + m))
            modules.append(factory())
    skeleton = modules[0]
    params = {
        name: torch.stack([dict(mod.named_parameters())[name].detach() for mod in modules])
        for name, _ in skeleton.named_parameters()
    }
    buffers = {
        name: torch.stack([dict(mod.named_buffers())[name].detach() for mod in modules])
        for name, _ in skeleton.named_buffers()
    }
    return skeleton, params, buffers


class Ensemble(nn.Module):
    """M members as one ``nn.Module``: member parameters stacked ``(M, ...)``, shared ones once.

    What a member is depends on its form (:mod:`diverse.nets.forms`, ``members_as``):

    * *member parameters* — :attr:`params`, ``{name: (M, *shape)}``: what every method
      sees as "the weights" (the weight-space kernel, SWAG moments, SGHMC momenta,
      checkpoints per member). ``full`` (the default): every trainable parameter of
      the user's module; ``head``: the named head modules; ``lora``: the adapters;
      ``batchensemble``: the rank-1 fast weights and biases.
    * *shared tensors* — :attr:`shared`, ``{name: tensor}``, stored once and passed to
      every member unbatched: frozen (the user's ``requires_grad=False`` parameters, a
      frozen backbone, LoRA's base weights) or trainable with the members' summed
      gradient (BatchEnsemble's slow weights, a trainable backbone), listed in
      :attr:`trainable`.
    * *member buffers* — :attr:`member_buffers`, ``(M, ...)``: BatchNorm statistics and
      frozen parameters that differ between members (never trained).

    Under ``vmap`` an operation whose inputs are all shared runs once for all members,
    so a shared frozen prefix (a head ensemble's backbone) is computed once per batch.

    All of them are registered on :attr:`stacked` (a copy of the member module whose
    tensors carry the member axis where they are per member), so ``parameters()``,
    ``buffers()``, ``state_dict()`` / ``load_state_dict()``, ``.to()`` and
    ``train()`` / ``eval()`` behave as for any module. ``member(i)`` returns member
    ``i`` as a plain module.

    Args:
        factory: builds one member (any ``nn.Module``; in the ``full`` form called M
            times, each under its own seed; in the other forms called once, or an
            ``nn.Module`` given directly, whose member parameters are then
            re-initialized per member).
        members: M ≥ 1.
        seed: initialization seed; member m uses ``member_seed(seed, offset+m)``.
        execution: ``"auto" | "vmap" | "loop"``.
        member_offset: global index of the first member held here (sharding).
        device: where parameters live.
        members_as: a :class:`diverse.nets.forms.MemberForm` (default ``Full()``).
    """

    def __init__(
        self,
        factory: Callable[[], nn.Module] | nn.Module,
        members: int,
        *,
        seed: int = 0,
        execution: str = "auto",
        member_offset: int = 0,
        device: torch.device | str = "cpu",
        members_as: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(members, int) or members < 1:
            raise UserError(f"ensemble members = {members!r}: must be an integer >= 1")
        if execution not in EXECUTIONS:
            raise UserError(f"ensemble execution = {execution!r}: allowed {', '.join(EXECUTIONS)}")
        built = build_members(Full() if members_as is None else members_as, factory, members,
                              seed, member_offset)
        self.form = built.form
        skeleton = built.skeleton
        # the skeleton gives the structure to functional_call; it is not a registered
        # child, so its tensors are not counted as parameters of the ensemble. Shared
        # tensors are the same objects in the skeleton and in ``stacked`` (stored once).
        self.__dict__["module"] = skeleton
        shared_objects = {id(t): t for t in built.shared.values()}
        self.stacked = copy.deepcopy(skeleton, memo=dict(shared_objects))
        for name, value in built.params.items():
            owner, leaf = _owner(self.stacked, name)
            owner._parameters[leaf] = nn.Parameter(value)
        for name, value in built.fixed.items():  # frozen, differing between members
            owner, leaf = _owner(self.stacked, name)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[leaf] = value
        for name, value in built.shared.items():
            for root in (self.stacked, skeleton):
                owner, leaf = _owner(root, name)
                if leaf in owner._parameters:
                    owner._parameters[leaf] = value
                else:
                    owner._buffers[leaf] = value
        self._member_names = tuple(built.params)
        self._fixed_names = tuple(built.fixed)
        self._shared_names = tuple(built.shared)
        self.members = members
        self.member_offset = member_offset
        self.seed = seed
        #: (precision, compile) once :func:`diverse.nets.precision.configure` has run
        self.configured: tuple[str, bool] | None = None
        #: the one slot is a generator whose forward returns (K, B, ...) (a hypernetwork)
        self.generates_members = bool(getattr(skeleton, "generates_members", False))
        #: the user's factory of one plain member (a method's ensemble wraps each member;
        #: weight samples and saved runs need the plain model) and the method it was made for
        self.base_factory: Callable[[], nn.Module] | nn.Module = factory
        self.built_for: str | None = None
        persistent = set(skeleton.state_dict())
        # non-persistent buffers are rebuilt by the factory (e.g. a hypernetwork's
        # prediction codes, drawn from its seed): never saved, never loaded
        self.derived_buffers: tuple[str, ...] = tuple(k for k in built.fixed
                                                      if k not in persistent)
        self.execution = execution
        self._vmapped = {
            shared: vmap(
                self._member_forward,
                in_dims=(0, 0, None, None if shared else 0),
                randomness="different",
            )
            for shared in (True, False)
        }
        self.to(device)
        self._refresh_views()

    def _refresh_views(self) -> None:
        named = dict(self.stacked.named_parameters(remove_duplicate=False))
        named.update(dict(self.stacked.named_buffers(remove_duplicate=False)))
        #: member parameters ``{name: (M, *shape)}`` — "the weights" of every method
        self.params: Params = {k: named[k] for k in self._member_names}
        #: per-member tensors that are not trained ``{name: (M, *shape)}`` (BatchNorm
        #: statistics, frozen parameters that differ between members)
        self.member_buffers: Params = {k: named[k] for k in self._fixed_names}
        #: tensors stored once and given to every member ``{name: tensor}``
        self.shared: Params = {k: named[k] for k in self._shared_names}

    @property
    def shared_trainable(self) -> Params:
        """The shared parameters that train (with the members' summed gradient)."""
        return {k: v for k, v in self.shared.items()
                if isinstance(v, nn.Parameter) and v.requires_grad}

    @property
    def trainable(self) -> Params:
        """Every tensor the optimizer updates: the member parameters, then the trainable
        shared ones under ``"shared/<name>"`` (the names checkpoints use)."""
        return {**self.params, **{SHARED + k: v for k, v in self.shared_trainable.items()}}

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Ensemble:
        # .to() / .double() / ... may replace buffer tensors: rebuild the name views
        super()._apply(fn, recurse)
        self.module._apply(fn, recurse)
        # a shared tensor is one object in both modules: re-link the skeleton to ours
        if getattr(self, "_shared_names", None):
            named = dict(self.stacked.named_parameters(remove_duplicate=False))
            named.update(dict(self.stacked.named_buffers(remove_duplicate=False)))
            for name in self._shared_names:
                owner, leaf = _owner(self.module, name)
                table = owner._parameters if leaf in owner._parameters else owner._buffers
                table[leaf] = named[name]
            self._refresh_views()
        elif hasattr(self, "_member_names"):
            self._refresh_views()
        return self

    # ------------------------------------------------------------------ forward
    def _member_forward(self, params: Params, buffers: Params, shared: Params,
                        x: Tensor) -> Tensor:
        out = functional_call(self.module, (params, buffers, shared), (x,), strict=True)
        return out if isinstance(out, Tensor) else model_output(out)

    def apply(
        self,
        params: Mapping[str, Tensor],
        x: Tensor,
        *,
        buffers: Mapping[str, Tensor] | None = None,
        shared: Mapping[str, Tensor] | None = None,
        per_member_input: bool = False,
        execution: str | None = None,
    ) -> Tensor:
        """Pure forward: stacked ``params`` and input → outputs ``(M, B, ...)``.

        ``x`` is ``(B, ...)`` shared by all members, or ``(M, B, ...)`` with
        ``per_member_input=True``. In training mode BatchNorm buffers (the
        stacked ``buffers``, default ``self.member_buffers``) are updated in place;
        ``shared`` (default ``self.shared``) are the tensors every member sees.
        """
        buffers = self.member_buffers if buffers is None else buffers
        shared = self.shared if shared is None else shared
        mode = execution or self.resolved_execution(x, per_member_input)
        if mode == "vmap":
            return self._vmapped[not per_member_input](dict(params), dict(buffers),
                                                       dict(shared), x)
        outs = []
        count = next(iter(params.values())).shape[0] if params else self.members
        for m in range(count):
            p = {k: v[m] for k, v in params.items()}
            b = {k: v[m] for k, v in buffers.items()}
            outs.append(self._member_forward(p, b, dict(shared), x[m] if per_member_input else x))
        return torch.stack(outs)

    def forward(self, x: Tensor, *, per_member_input: bool = False) -> Tensor:
        """Outputs of every member ``(M, B, ...)`` for ``x`` ``(B, ...)`` (or ``(M, B, ...)``)."""
        return self.apply(self.params, x, per_member_input=per_member_input)

    def features(
        self,
        x: Tensor,
        layers: Sequence[str],
        *,
        params: Mapping[str, Tensor] | None = None,
        per_member_input: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Outputs ``(M, B, ...)`` and the outputs of named submodules.

        Returns ``(out, {layer: (M, B, ...)})``. Features are captured with
        forward hooks inside the (vectorized) member function and returned
        from it, so they carry the member axis and stay differentiable.
        """
        params = self.params if params is None else params
        layers = tuple(layers)
        member = capturing(self._member_forward, self.module, layers, "the model")

        mode = self.resolved_execution(x, per_member_input)
        if mode == "vmap":
            fn = vmap(member, in_dims=(0, 0, None, 0 if per_member_input else None),
                      randomness="different")
            # (a layer of a shared prefix is computed once; vmap gives it the member axis)
            out, feats = fn(dict(params), dict(self.member_buffers), dict(self.shared), x)
        else:
            results = [
                member({k: v[m] for k, v in params.items()},
                       {k: v[m] for k, v in self.member_buffers.items()},
                       dict(self.shared),
                       x[m] if per_member_input else x)
                for m in range(self.members)
            ]
            out = torch.stack([r[0] for r in results])
            feats = tuple(torch.stack([r[1][i] for r in results]) for i in range(len(layers)))
        return out, dict(zip(layers, feats, strict=True))

    # ---------------------------------------------------------------- execution
    def resolved_execution(self, x: Tensor | None = None, per_member_input: bool = False) -> str:
        """The execution in use; ``"auto"`` is resolved on the first batch seen.

        The choice is timed once per (model, form, M, input shape, device, torch
        version) and remembered in ``$DIVERSE_CACHE_DIR/execution.json``
        (default ``~/.cache/diverse``), so repeated runs of one config make the
        same choice and give the same numbers.
        """
        if self.execution == "auto":
            if x is None:
                raise RuntimeError("execution 'auto' is resolved on the first forward")
            key = "|".join(map(str, (
                type(self.module).__name__, sum(v[0].numel() for v in self.params.values()),
                self.members, tuple(x.shape), per_member_input, x.device.type,
                torch.__version__) + ((self.form.name,) if self.form.name != "full" else ())))
            cache = _execution_cache()
            choice = cache.get(key)
            if choice not in ("vmap", "loop"):
                choice = self.time_executions(x, per_member_input)[0]
                _store_execution(key, choice)
            self.execution = choice
        return self.execution

    def time_executions(
        self, x: Tensor, per_member_input: bool = False, repeats: int = 3
    ) -> tuple[str, dict[str, float]]:
        """Time forward + backward of both executions; return (faster, seconds).

        Training-mode buffers (BatchNorm statistics) are restored afterwards,
        and the global RNG state too, so timing leaves no trace on a run.
        """
        saved = {k: v.clone() for k, v in {**self.member_buffers, **self.shared}.items()
                 if not isinstance(v, nn.Parameter)}
        times: dict[str, float] = {}
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
                torch.enable_grad():
            for mode in ("loop", "vmap", "loop", "vmap"):  # second round is measured
                best = float("inf")
                for _ in range(repeats):
                    params = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
                    _sync(x)
                    t0 = time.perf_counter()
                    out = self.apply(params, x, per_member_input=per_member_input, execution=mode)
                    out.float().square().mean().backward()
                    _sync(x)
                    best = min(best, time.perf_counter() - t0)
                times[mode] = best
        with torch.no_grad():
            current = {**self.member_buffers, **self.shared}
            for k, v in saved.items():
                current[k].copy_(v)
        for p in self.shared_trainable.values():
            p.grad = None  # the timing's backward left no gradient behind
        return min(times, key=times.__getitem__), times

    # ------------------------------------------------------------ modes, views
    def train(self, mode: bool = True) -> Ensemble:
        super().train(mode)
        self.module.train(mode)
        self.form.set_modes(self.module, mode)
        return self

    def plain_model(self) -> nn.Module:
        """A fresh plain member (``base_factory()``, no method wrapper) on this device, in
        eval mode, built under a forked RNG so building it never shifts a run's stream;
        weight samples give it its weights. In a form other than ``full`` it is the
        member module itself (shared tensors included; member tensors from a sample)."""
        if self.form.name != "full" or isinstance(self.base_factory, nn.Module):
            plain = copy.deepcopy(self.module, memo={id(t): t for t in self.shared.values()})
            plain.diverse_shared = self._shared_names  # its own tensors, not in samples
            return plain.eval()
        with torch.random.fork_rng(devices=[]):
            plain = self.base_factory().eval().to(self.device)
        if self._shared_names:  # frozen parameters shared by every member: the factory's
            plain.diverse_shared = self._shared_names
        return plain

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def member(self, m: int) -> nn.Module:
        """A standalone copy of member ``m`` as an ordinary module (shared tensors copied)."""
        mod = copy.deepcopy(self.module)
        state = {k: v[m].detach().clone()
                 for k, v in {**self.params, **self.member_buffers}.items()}
        state.update({k: v.detach().clone() for k, v in self.shared.items()})
        mod.load_state_dict(state, strict=False)
        return mod

    def state_tensors(self) -> dict[str, Tensor]:
        """What a checkpoint stores of the members: member parameters and persistent
        member buffers, stacked ``(M, ...)`` under their module names, then the trainable
        shared parameters and the shared buffers once, under ``"shared/<name>"``.

        Non-persistent buffers (``derived_buffers``) are left out: the factory
        rebuilds them; so are the frozen shared parameters (the user's pretrained
        weights: :meth:`frozen_fingerprint` identifies them).
        """
        out = {**{k: v.detach() for k, v in self.params.items()},
               **{k: v for k, v in self.member_buffers.items() if k not in self.derived_buffers}}
        out.update({SHARED + k: v.detach() for k, v in self.shared.items()
                    if not isinstance(v, nn.Parameter) or v.requires_grad})
        return out

    def frozen_fingerprint(self) -> str | None:
        """SHA-256 of the frozen shared parameters (names, shapes, dtypes, bytes), or None
        when there are none: a checkpoint records it instead of the tensors, and a resume
        or ``load`` refuses a factory whose frozen weights differ."""
        frozen = {k: v for k, v in self.shared.items()
                  if isinstance(v, nn.Parameter) and not v.requires_grad}
        if not frozen:
            return None
        digest = hashlib.sha256()
        for name in sorted(frozen):
            t = frozen[name].detach().cpu().contiguous()
            digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Copy stacked tensors in.

        Every tensor of :meth:`state_tensors` must be present with its shape;
        other keys (e.g. a derived buffer an older version saved) are ignored.
        """
        expected = {k: tuple(v.shape) for k, v in self.state_tensors().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items() if k in expected}
        missing = sorted(set(expected) - set(got))
        if missing or got != expected:
            bad = missing[0] if missing else next(k for k in got if got[k] != expected[k])
            raise UserError(
                f"checkpoint tensor {bad!r} does not match the model: expected shape "
                f"{expected.get(bad)}, found {got.get(bad, 'nothing')}"
            )
        current = {**self.params, **self.member_buffers,
                   **{SHARED + k: v for k, v in self.shared.items()}}
        for k in expected:
            current[k].copy_(tensors[k])


#: the key prefix of a shared tensor in checkpoints and optimizer state
SHARED = "shared/"


def model_output(out: Any) -> Tensor:
    """The tensor of a model's output: itself, or the ``logits`` of an output object (a
    ``transformers`` model's ``ModelOutput``); anything else is refused with one line."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise UserError(f"the model returned {type(out).__name__}: a member must return a tensor "
                    "(B, outputs) or an object with .logits (a transformers ModelOutput)")


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule of ``root`` that holds tensor ``name`` and the tensor's own name."""
    path, _, leaf = name.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def capturing(
    forward: Callable[..., Tensor], module: nn.Module, layers: Sequence[str], owner: str
) -> Callable[..., tuple[Tensor, tuple[Tensor, ...]]]:
    """``forward(*args)`` that also returns the outputs of ``module``'s named ``layers``.

    Forward hooks are registered inside the returned per-member function and
    the captured tensors are returned from it, so under ``vmap`` they carry the
    member axis and stay differentiable. An unknown layer raises
    :class:`UserError` naming ``owner`` and the allowed module names.
    """
    named = dict(module.named_modules())
    named.update({n[len(PEFT_PREFIX):]: m for n, m in named.items()
                  if n.startswith(PEFT_PREFIX)})  # a LoRA form's layers by the user's names
    unknown = [name for name in layers if name not in named]
    if unknown:
        raise UserError(
            f"feature layer {unknown[0]!r} is not a module of {owner}; "
            f"allowed: {', '.join(n for n in named if n)}"
        )

    def member(*args: Tensor | Params) -> tuple[Tensor, tuple[Tensor, ...]]:
        captured: dict[str, Tensor] = {}
        handles = [
            named[name].register_forward_hook(
                lambda _mod, _inp, out, name=name: captured.__setitem__(name, out)
            )
            for name in layers
        ]
        try:
            out = forward(*args)
        finally:
            for h in handles:
                h.remove()
        return out, tuple(captured[name] for name in layers)

    return member


def _cache_path() -> Path:
    root = os.environ.get("DIVERSE_CACHE_DIR") or Path.home() / ".cache" / "diverse"
    return Path(root) / "execution.json"


def _execution_cache() -> dict[str, str]:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_execution(key: str, choice: str) -> None:
    """Remember an ``auto`` decision (best effort: a read-only home just skips it)."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = {**_execution_cache(), key: choice}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def _sync(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


# ----------------------------------------------------------------- embeddings
def flatten_params(params: Mapping[str, Tensor]) -> Tensor:
    """Stacked parameters → one row per member, ``(M, D)`` (the weight space)."""
    return torch.cat([v.reshape(v.shape[0], -1) for v in params.values()], dim=1)


def unflatten_params(flat: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`flatten_params`: ``(M, D)`` → ``{name: (M, *shape)}``."""
    out, start = {}, 0
    for k, v in like.items():
        n = v[0].numel()
        out[k] = flat[:, start : start + n].reshape(v.shape)
        start += n
    if start != flat.shape[1]:
        raise ValueError(f"flat has {flat.shape[1]} columns, parameters need {start}")
    return out


def pull_back(embedding: Tensor, params: Mapping[str, Tensor], direction: Tensor) -> Params:
    """Vector-Jacobian product: an update in an embedding space → weights.

    ``embedding`` is ``(M, ...)`` computed from ``params`` with autograd;
    ``direction`` has the same shape. Returns ``{name: (M, *shape)}`` with
    ``Δw_m = J_m(w_m)ᵀ v_m``, where ``J_m = ∂embedding_m / ∂w_m`` (members do
    not share parameters, so the product separates per member).
    """
    names = list(params)
    grads = torch.autograd.grad(
        embedding, [params[k] for k in names], grad_outputs=direction, allow_unused=True
    )
    return {
        k: torch.zeros_like(params[k]) if g is None else g
        for k, g in zip(names, grads, strict=True)
    }


@contextmanager
def evaluating(ensemble: Ensemble) -> Iterator[Ensemble]:
    """Temporarily put the ensemble in eval mode (restores the previous mode)."""
    was = ensemble.training
    ensemble.eval()
    try:
        yield ensemble
    finally:
        ensemble.train(was)
