"""What a member is: the forms of an ensemble over one model (``[ensemble] members_as``).

An :class:`~diverse.nets.ensemble.Ensemble` separates *member parameters*, stacked
``(M, ...)`` — what every method sees as the weights — from *shared tensors*, stored
once and given to every member unbatched (frozen, or trainable with the members'
summed gradient). A form decides which is which, how the user's module is turned
into the member template, and how member ``m``'s parameters are initialized (under
its own seed, ``member_seed(seed, m)``):

* :class:`Full` — every trainable parameter per member, each member a fresh
  ``factory()`` (the deep-ensemble default). Parameters the user froze
  (``requires_grad=False``) are never trained: shared once when every member has
  the same values (a pretrained backbone), else kept per member, fixed.
* :class:`Head` — the named head modules per member (re-initialized per member
  by their ``reset_parameters``); everything else shared: frozen (default; it then
  runs in eval mode — BatchNorm on its pretrained statistics, no dropout — and under
  ``vmap`` once per batch for all members) or trainable.
* :class:`LoRA` — low-rank adapters (Hu et al. 2022) through the ``peft`` library on
  named Linear/Conv layers: a user's ``PeftModel`` or a ``peft.LoraConfig`` applied
  to the user's module. The frozen base weights are shared; each member's adapters
  are peft's own initialization drawn under the member's seed (``lora_B = 0``, so
  every member starts at the base model's function, as in LoRA ensembles, Wang et
  al. 2023).
* :class:`BatchEnsemble` — rank-1 fast weights per member over shared trainable slow
  weights on Linear/Conv2d layers (Wen, Tran & Ba, ICLR 2020):
  ``W_m = W ∘ (s_m r_mᵀ)``, i.e. ``y = ((x ∘ r_m) Wᵀ) ∘ s_m + b_m``
  (:mod:`diverse.nets.batchensemble`).

A parameter the user froze is never trained in any form: it is shared frozen, or the
form refuses with one line (a frozen head parameter).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from diverse.errors import UserError

FORMS = ("full", "head", "lora", "batchensemble")


class Built(NamedTuple):
    """The members of one ensemble, as :func:`build_members` makes them.

    Attributes:
        skeleton: the member module (structure for ``functional_call``).
        form: the form resolved against the model (a head form's default head named).
        params: member parameters ``{name: (M, *shape)}``.
        fixed: per-member tensors that are not trained ``{name: (M, *shape)}``
            (buffers; frozen parameters that differ between members).
        shared: ``{name: tensor}`` given to every member (the skeleton's own objects;
            a frozen parameter has ``requires_grad=False``).
    """

    skeleton: nn.Module
    params: dict[str, Tensor]
    fixed: dict[str, Tensor]
    shared: dict[str, Tensor]
    form: MemberForm  # the form with every default resolved against the model


def member_seed(seed: int, member: int) -> int:
    """Seed of member ``member`` (global index) in a run with seed ``seed``."""
    return (seed * 1_000_003 + member * 7_919 + 12_345) % (2**63 - 1)


def _module(factory: Callable[[], nn.Module] | nn.Module) -> nn.Module:
    module = factory if isinstance(factory, nn.Module) else factory()
    if not isinstance(module, nn.Module):
        raise UserError(f"the model factory returned {type(module).__name__}, not an nn.Module")
    return module


@dataclass(frozen=True)
class MemberForm:
    """A form (abstract): see the module docstring. Subclasses are final."""

    name: ClassVar[str] = ""

    def template(self, module: nn.Module) -> nn.Module:
        """The member template made from the user's module (may convert layers)."""
        return module

    def resolve(self, template: nn.Module) -> MemberForm:
        """This form with its model-dependent defaults filled in (a new object)."""
        return self

    def member_names(self, template: nn.Module) -> list[str]:
        """The parameters that are per member."""
        raise NotImplementedError

    def trainable_shared(self, template: nn.Module, name: str) -> bool:
        """Whether shared parameter ``name`` trains (if the user did not freeze it)."""
        return False

    def member_buffer(self, template: nn.Module, name: str) -> bool:
        """Whether buffer ``name`` is per member (True) or shared."""
        return True

    def init_member(self, template: nn.Module) -> None:
        """Re-initialize the member parameters in place (under the member's seed)."""
        raise NotImplementedError

    def set_modes(self, template: nn.Module, training: bool) -> None:
        """Adjust train/eval modes after ``train(training)`` (a frozen backbone's eval)."""

    def describe(self) -> dict[str, Any]:
        """The form as a JSON-able record (a run's ``model.json``)."""
        out: dict[str, Any] = {"members_as": self.name}
        for key, value in self.__dict__.items():
            if isinstance(value, (str, int, float, bool, tuple, list)) or value is None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class Full(MemberForm):
    """Every trainable parameter per member; each member a fresh ``factory()``."""

    name: ClassVar[str] = "full"


@dataclass(frozen=True)
class Head(MemberForm):
    """Named head modules per member over one shared backbone.

    Fields:
        modules: names of the head modules (e.g. ``("fc",)``), per member; empty: the
            last module with parameters of its own (resolved when the members are built).
        train_backbone: False (default): the rest is frozen, in eval mode; True: it
            trains with the members' summed gradient (parameters the user froze stay
            frozen).
        reinit: re-initialize every member's head by ``reset_parameters`` under its
            seed (default True); False starts every member from the given head.
    """

    name: ClassVar[str] = "head"
    modules: tuple[str, ...] = ()
    train_backbone: bool = False
    reinit: bool = True

    def resolve(self, template: nn.Module) -> Head:
        """No head named: the last module with parameters of its own."""
        if self.modules:
            return self
        last = [n for n, m in template.named_modules()
                if n and any(True for _ in m.parameters(recurse=False))]
        if not last:
            raise UserError("[ensemble] members_as = 'head': the model has no parameters")
        return dataclasses.replace(self, modules=(last[-1],))

    def _heads(self, template: nn.Module) -> dict[str, nn.Module]:
        named = dict(template.named_modules())
        for name in self.modules:
            if name not in named or name == "":
                allowed = ", ".join(n for n, m in template.named_modules()
                                    if n and any(True for _ in m.parameters(recurse=False)))
                raise UserError(f"[ensemble] head_modules: {name!r} is not a module of the "
                                f"model; modules with parameters: {allowed}")
        return {name: named[name] for name in self.modules}

    def _inside(self, name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in self.modules)

    def member_names(self, template: nn.Module) -> list[str]:
        self._heads(template)
        names = [n for n, _ in template.named_parameters() if self._inside(n)]
        if not names:
            raise UserError(f"[ensemble] head_modules = {list(self.modules)}: they hold no "
                            "parameters")
        frozen = [n for n, p in template.named_parameters() if self._inside(n)
                  and not p.requires_grad]
        if frozen:
            raise UserError(f"head parameter {frozen[0]!r} is frozen (requires_grad=False): "
                            "the head form trains every head parameter per member; unfreeze "
                            "it or leave its module out of head_modules")
        return names

    def trainable_shared(self, template: nn.Module, name: str) -> bool:
        return self.train_backbone

    def member_buffer(self, template: nn.Module, name: str) -> bool:
        return self._inside(name)

    def init_member(self, template: nn.Module) -> None:
        if not self.reinit:
            return
        for name, head in self._heads(template).items():
            resettable = [m for m in head.modules() if hasattr(m, "reset_parameters")]
            if not resettable:
                raise UserError(f"head module {name!r} has no reset_parameters(); set "
                                "[ensemble] head_reinit = false to start every member from it")
            for m in resettable:
                m.reset_parameters()

    def set_modes(self, template: nn.Module, training: bool) -> None:
        if self.train_backbone or not training:
            return
        for name, module in template.named_modules():
            above = any(h.startswith(name + ".") for h in self.modules) or name == ""
            if not above and not self._inside(name):
                module.training = False


@dataclass(frozen=True)
class LoRA(MemberForm):
    """LoRA adapters per member through ``peft``; the base weights shared and frozen.

    Fields:
        config: a ``peft.LoraConfig`` (Python only); None builds one from the fields
            below. A module that is already a ``peft.PeftModel`` is used as it is.
        rank: r (default 8). alpha: lora_alpha (default 16). dropout: lora_dropout
            (default 0.0).
        target_modules: names (or name suffixes, as peft matches them) of the
            Linear/Conv layers that get adapters.
        modules_to_save: modules trained in full per member (e.g. a new classifier;
            re-initialized per member by ``reset_parameters``).
    """

    name: ClassVar[str] = "lora"
    config: Any = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.config is None and not self.target_modules:
            raise UserError("[ensemble] members_as = 'lora' needs target_modules (the "
                            "Linear/Conv layers that get adapters) or a peft.LoraConfig")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise UserError(f"[ensemble] lora_rank = {self.rank!r}: must be an integer >= 1")

    def template(self, module: nn.Module) -> nn.Module:
        import peft

        if isinstance(module, peft.PeftModel):
            return module
        named = dict(module.named_modules())
        unknown = [n for n in self.modules_to_save if n not in named]
        if unknown:
            raise UserError(f"[ensemble] modules_to_save: {unknown[0]!r} is not a module of the "
                            f"model; modules: {', '.join(n for n in named if n)}")
        # modules_to_save are trained per member by unfreezing them here, not by peft's
        # wrapper: peft matches them by a plain suffix of module names, so "out" would also
        # hit its own "fc1.lora_dropout"; and every member holds its own copy anyway
        config = self.config or peft.LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules))
        try:
            with warnings.catch_warnings():
                # peft reads transformers' deprecated is_gradient_checkpointing (transformers 5)
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                        FutureWarning)
                adapted = peft.get_peft_model(module, config)
        except (ValueError, TypeError) as err:  # peft: modules not found, unsupported layer
            raise UserError(f"[ensemble] lora: {str(err).splitlines()[0]}") from None
        for name in self.modules_to_save:
            adapted.get_base_model().get_submodule(name).requires_grad_(True)
        return adapted

    def describe(self) -> dict[str, Any]:
        if self.config is None:
            return super().describe()
        config = {k: sorted(v) if isinstance(v, set) else v
                  for k, v in self.config.to_dict().items()}
        return {"members_as": "lora", "peft_config": config}

    def member_names(self, template: nn.Module) -> list[str]:
        names = [n for n, p in template.named_parameters() if p.requires_grad]
        if not names:
            raise UserError("[ensemble] lora: the adapted model has no trainable parameters")
        return names

    def init_member(self, template: nn.Module) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        for module in template.modules():
            if isinstance(module, LoraLayer):
                for adapter in module.lora_A:
                    init = template.peft_config[adapter].init_lora_weights  # type: ignore
                    module.reset_lora_parameters(adapter, init)
            elif isinstance(module, ModulesToSaveWrapper):  # a user's own LoraConfig's
                for copy_ in module.modules_to_save.values():
                    for m in copy_.modules():
                        if hasattr(m, "reset_parameters"):
                            m.reset_parameters()
        for name in self.modules_to_save:  # the form's own: new heads per member
            for m in template.get_base_model().get_submodule(name).modules():  # type: ignore
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()


@dataclass(frozen=True)
class BatchEnsemble(MemberForm):
    """Rank-1 fast weights per member over shared trainable slow weights.

    Fields:
        modules: names of the Linear/Conv2d layers to convert; empty (default): all.
        init: ``"random-sign"`` (default; every entry of r_m, s_m is ±1 with
            probability ½, Wen et al.'s initialization) or ``"normal"`` (N(1, init_std²)).
        init_std: the standard deviation of ``"normal"`` (default 0.5).
    """

    name: ClassVar[str] = "batchensemble"
    modules: tuple[str, ...] = ()
    init: str = "random-sign"
    init_std: float = 0.5

    def __post_init__(self) -> None:
        if self.init not in ("random-sign", "normal"):
            raise UserError(f"[ensemble] batchensemble_init = {self.init!r}: allowed "
                            "random-sign, normal")

    def template(self, module: nn.Module) -> nn.Module:
        from diverse.nets.batchensemble import convert

        return convert(module, self.modules)

    def member_names(self, template: nn.Module) -> list[str]:
        from diverse.nets.batchensemble import FAST

        return [n for n, p in template.named_parameters()
                if n.rpartition(".")[2] in FAST and p.requires_grad]

    def trainable_shared(self, template: nn.Module, name: str) -> bool:
        return True

    def init_member(self, template: nn.Module) -> None:
        from diverse.nets.batchensemble import BatchEnsembleLayer

        with torch.no_grad():
            for module in template.modules():
                if isinstance(module, BatchEnsembleLayer):
                    for fast in (module.r, module.s):
                        if self.init == "random-sign":
                            fast.copy_(torch.randint(0, 2, fast.shape, dtype=fast.dtype) * 2 - 1)
                        else:
                            fast.normal_(1.0, self.init_std)


def build_members(form: MemberForm, factory: Callable[[], nn.Module] | nn.Module, members: int,
                  seed: int, member_offset: int = 0) -> Built:
    """Members ``member_offset .. member_offset+members-1`` of ``factory`` in ``form``."""
    if isinstance(form, Full):
        return _build_full(factory, members, seed, member_offset)
    # one template for every member (and every process): built under member 0's seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(member_seed(seed, 0))
        template = form.template(_module(factory))
    form = form.resolve(template)
    member = form.member_names(template)
    named = dict(template.named_parameters())
    values: dict[str, list[Tensor]] = {k: [] for k in member}
    for m in range(members):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member_seed(seed, member_offset + m))
            form.init_member(template)
        for k in member:
            values[k].append(named[k].detach().clone())
    params = {k: torch.stack(v) for k, v in values.items()}
    shared: dict[str, Tensor] = {}
    for k, p in named.items():
        if k in params:
            continue
        trains = p.requires_grad and form.trainable_shared(template, k)
        p.requires_grad_(trains)
        shared[k] = p
    fixed: dict[str, Tensor] = {}
    for k, b in template.named_buffers():
        if form.member_buffer(template, k):
            fixed[k] = b.detach().unsqueeze(0).repeat(members, *([1] * b.dim()))
        else:
            shared[k] = b
    return Built(template, params, fixed, shared, form)


def _build_full(factory: Callable[[], nn.Module] | nn.Module, members: int, seed: int,
                member_offset: int) -> Built:
    modules = []
    for m in range(members):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member_seed(seed, member_offset + m))
            if isinstance(factory, nn.Module):
                modules.append(copy.deepcopy(factory))
            else:
                modules.append(_module(factory))
    skeleton = modules[0]
    per_module = [dict(mod.named_parameters()) for mod in modules]
    params: dict[str, Tensor] = {}
    fixed: dict[str, Tensor] = {}
    shared: dict[str, Tensor] = {}
    for name, p in skeleton.named_parameters():
        rows = [pm[name].detach() for pm in per_module]
        if p.requires_grad:
            params[name] = torch.stack(rows)
        elif all(torch.equal(rows[0], r) for r in rows[1:]):
            shared[name] = p  # frozen and the same in every member: stored once
        else:
            fixed[name] = torch.stack(rows)  # frozen but different: per member, never trained
    for name, _ in skeleton.named_buffers():
        fixed[name] = torch.stack([dict(mod.named_buffers())[name].detach() for mod in modules])
    return Built(skeleton, params, fixed, shared, Full())


def form_from_config(members_as: str, *, head_modules: Sequence[str] = (),
                     train_backbone: bool = False, head_reinit: bool = True,
                     lora_rank: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                     target_modules: Sequence[str] = (), modules_to_save: Sequence[str] = (),
                     batchensemble_init: str = "random-sign",
                     batchensemble_std: float = 0.5) -> MemberForm:
    """The :class:`MemberForm` of the ``[ensemble]`` keys."""
    if members_as == "full":
        return Full()
    if members_as == "head":
        return Head(tuple(head_modules), train_backbone, head_reinit)
    if members_as == "lora":
        return LoRA(None, lora_rank, lora_alpha, lora_dropout, tuple(target_modules),
                    tuple(modules_to_save))
    if members_as == "batchensemble":
        return BatchEnsemble(tuple(target_modules), batchensemble_init, batchensemble_std)
    raise UserError(f"[ensemble] members_as = {members_as!r}: allowed {', '.join(FORMS)}")


def form_from_record(record: dict[str, Any] | None) -> MemberForm | None:
    """The form a run's ``model.json`` describes (:meth:`MemberForm.describe`); None: full."""
    if not record or record.get("members_as", "full") in ("full", "heterogeneous"):
        return None  # (a heterogeneous run's groups are described beside it)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()
              if k != "members_as"}
    kind = record["members_as"]
    if kind == "lora" and "peft_config" in fields:
        import peft

        config = dict(record["peft_config"])
        for key in ("peft_type", "task_type", "auto_mapping", "base_model_name_or_path",
                    "revision", "inference_mode"):
            config.pop(key, None)
        return LoRA(config=peft.LoraConfig(**{k: v for k, v in config.items()
                                              if k in peft.LoraConfig.__dataclass_fields__}))
    forms = {"head": Head, "lora": LoRA, "batchensemble": BatchEnsemble}
    if kind not in forms:
        raise UserError(f"members_as = {kind!r} in the run: allowed {', '.join(FORMS)}")
    return forms[kind](**fields)


#: where peft puts the user's module inside a PeftModel
PEFT_PREFIX = "base_model.model."


def resolve_layer(module: nn.Module, name: str) -> str:
    """A layer named as in the user's module → its name in the member template (a LoRA
    form's ``PeftModel`` holds the user's module under ``base_model.model.``)."""
    named = dict(module.named_modules())
    if name not in named and PEFT_PREFIX + name in named:
        return PEFT_PREFIX + name
    return name
