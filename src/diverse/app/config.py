"""Run configuration: typed, frozen dataclasses read from TOML.

A config file has the sections ``[data]``, ``[model]``, ``[ensemble]``,
``[method]``, ``[train]``, ``[likelihood]`` and ``[logging]``. ``[model]`` and ``[method]``
pick their dataclass by their ``name`` key (each model and method documents
its own keys); the other sections have one dataclass each. Every key has a
default, so an empty section (or file) is valid. ``--set section.key=value``
overrides are parsed as TOML values (``train.lr=0.01``,
``model.hidden=[100, 100]``, ``data.name=digits``; a bare word is a string).

Unknown sections or keys, wrong types and unknown names raise
:class:`~diverse.errors.UserError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from diverse.app.optim import OPTIMIZERS, SCHEDULES
from diverse.app.tracking import LoggingConfig, check_backend
from diverse.data.datasets import DATASETS, DataConfig
from diverse.errors import UserError
from diverse.methods.catalog import METHODS
from diverse.nets.ensemble import EXECUTIONS
from diverse.nets.forms import FORMS
from diverse.nets.likelihoods import LIKELIHOODS, LikelihoodConfig
from diverse.nets.models import MODELS
from diverse.nets.precision import PRECISIONS


@dataclass(frozen=True)
class EnsembleConfig:
    """The ``[ensemble]`` section.

    Fields:
        members: number of members M ≥ 1 (default 5).
        execution: ``"auto"`` (time both on the first batch, keep the faster),
            ``"vmap"`` or ``"loop"`` (default ``"auto"``). The resolved choice
            is saved in the run so a resumed run uses the same one.
        members_as: what a member is (:mod:`diverse.nets.forms`): ``"full"`` (default),
            ``"head"``, ``"lora"`` or ``"batchensemble"``.
        head_modules: ``head``: the per-member modules (default: the model's last
            module with parameters). train_backbone: ``head``: train the shared rest
            (default false: frozen, in eval mode). head_reinit: ``head``: re-initialize
            each member's head under its seed (default true).
        lora_rank, lora_alpha, lora_dropout: ``lora``: r, alpha, dropout (8, 16, 0).
        target_modules: ``lora``: the layers that get adapters (required);
            ``batchensemble``: the Linear/Conv2d layers converted (default all).
        modules_to_save: ``lora``: modules trained in full per member (a new head).
        batchensemble_init: ``"random-sign"`` (default) or ``"normal"``;
            batchensemble_std: σ of ``"normal"`` (0.5).
    """

    members: int = 5
    execution: str = "auto"
    members_as: str = "full"
    head_modules: tuple[str, ...] = ()
    train_backbone: bool = False
    head_reinit: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()
    batchensemble_init: str = "random-sign"
    batchensemble_std: float = 0.5

    def form(self) -> Any:
        """The :class:`diverse.nets.forms.MemberForm` these keys describe."""
        from diverse.nets.forms import form_from_config

        return form_from_config(
            self.members_as, head_modules=self.head_modules, train_backbone=self.train_backbone,
            head_reinit=self.head_reinit, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout, target_modules=self.target_modules,
            modules_to_save=self.modules_to_save, batchensemble_init=self.batchensemble_init,
            batchensemble_std=self.batchensemble_std)


@dataclass(frozen=True)
class TrainConfig:
    """The ``[train]`` section.

    Fields:
        epochs: passes over the training set (default 10).
        steps: if > 0, the total number of optimizer steps instead (the last
            epoch stops early); default 0.
        batch_size: examples per step, shared by all members (default 128).
        lr: base learning rate (default 1e-3).
        optimizer: ``"sgd" | "adam" | "adamw"`` (default ``"adam"``).
        momentum: SGD momentum (default 0.9). nesterov: SGD Nesterov (false).
        betas: Adam/AdamW betas (default [0.9, 0.999]).
        schedule: ``"constant" | "cosine" | "constant-linear"`` (default
            ``"cosine"``); ``final_lr_factor`` is the factor reached at the end
            (default 0.01).
        prior_std: σ of an isotropic Gaussian prior N(0, σ²I) on every weight,
            entering the log posterior (0 = none, the default). Use either
            this or ``weight_decay``.
        weight_decay: optimizer weight decay (L2 for SGD/Adam, decoupled for
            AdamW); default 0.
        seed: seed of initialization, shuffling and dropout (default 0).
        eval_every: evaluate on the test set every this many epochs (1; 0 = only
            at the end).
        keep_checkpoints: epoch checkpoints kept on disk (default 2).
        checkpoint_every: write a checkpoint every this many epochs (default 1;
            the last epoch always). A resume restarts after the last one.
        checkpoint_every_steps: also write one every this many optimizer steps
            within an epoch (default 0 = epochs only); a resume then restarts
            mid-epoch, at exactly the next batch.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        precision: ``"fp32"`` (default) or ``"bf16"``: the member forward under
            bf16 autocast (:mod:`diverse.nets.precision`).
        compile: ``torch.compile`` the vmapped member forward (default false;
            methods with double backward, FoRDE, run eagerly).
    """

    epochs: int = 10
    steps: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, ...] = (0.9, 0.999)
    schedule: str = "cosine"
    final_lr_factor: float = 0.01
    prior_std: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 1
    keep_checkpoints: int = 2
    checkpoint_every: int = 1
    checkpoint_every_steps: int = 0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False

    def __post_init__(self) -> None:
        """Valid once constructed (from TOML or in Python): one-line UserError otherwise."""
        _choice(self.optimizer, OPTIMIZERS, "[train] optimizer")
        _choice(self.schedule, SCHEDULES, "[train] schedule")
        _choice(self.device, ("auto", "cpu", "cuda"), "[train] device")
        _choice(self.precision, PRECISIONS, "[train] precision")
        for where, value in (("batch_size", self.batch_size),
                             ("keep_checkpoints", self.keep_checkpoints),
                             ("checkpoint_every", self.checkpoint_every)):
            if value < 1:
                raise UserError(f"[train] {where} = {value}: must be an integer >= 1")
        if self.checkpoint_every_steps < 0:
            raise UserError(f"[train] checkpoint_every_steps = {self.checkpoint_every_steps}: "
                            "must be >= 0 (0 = epochs only)")
        if self.epochs < 1 and self.steps < 1:
            raise UserError(f"[train] epochs = {self.epochs}: must be >= 1 (or set steps >= 1)")
        for key, value in (("lr", self.lr), ("momentum", self.momentum),
                           ("final_lr_factor", self.final_lr_factor),
                           ("prior_std", self.prior_std), ("weight_decay", self.weight_decay),
                           *(("betas", b) for b in self.betas)):
            if not math.isfinite(value):
                raise UserError(f"[train] {key} = {value}: must be a finite number")
        if not self.lr > 0:
            raise UserError(f"[train] lr = {self.lr}: must be > 0")
        if self.prior_std < 0 or self.weight_decay < 0:
            raise UserError("[train] prior_std and weight_decay must be >= 0")
        if self.prior_std > 0 and self.weight_decay > 0:
            raise UserError(f"[train] prior_std = {self.prior_std} and weight_decay = "
                            f"{self.weight_decay}: set one of them, not both")
        if len(self.betas) != 2:
            raise UserError(f"[train] betas = {list(self.betas)}: expected two numbers")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    method: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SECTIONS = ("data", "model", "ensemble", "method", "train", "likelihood", "logging")


# ------------------------------------------------------------------ converting
def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, where)
            except UserError:
                continue
        raise UserError(f"{where} = {value!r}: wrong type")
    if origin is tuple:
        (item, *_rest) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value] if value else []
        if not isinstance(value, list | tuple):
            raise UserError(f"{where} = {value!r}: expected {_type_name(tp)}")
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise UserError(f"{where} = {value!r}: expected true/false")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{where} = {value!r}: expected an integer")
    if tp in (float, str) and not isinstance(value, tp):
        raise UserError(f"{where} = {value!r}: expected {_type_name(tp)}")
    return value


def from_mapping(cls: type, mapping: dict[str, Any], section: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in mapping:
        if key not in hints:
            raise UserError(
                f"unknown key [{section}] {key!r}; allowed: {', '.join(names)}"
            )
    kwargs = {
        key: _coerce(value, hints[key], f"[{section}] {key}") for key, value in mapping.items()
    }
    return cls(**kwargs)


def _named(table: dict[str, Any], registry: dict[str, tuple[type, Any]], section: str,
           default: str) -> Any:
    name = table.get("name", default)
    if name not in registry:
        raise UserError(
            f"unknown {section} {name!r}; allowed: {', '.join(sorted(registry))}"
        )
    return from_mapping(registry[name][0], {**table, "name": name}, section)


def _choice(value: str, allowed: tuple[str, ...] | list[str], where: str) -> None:
    if value not in allowed:
        raise UserError(f"{where} = {value!r}: allowed {', '.join(allowed)}")


def validate(cfg: Config) -> Config:
    """Checks of values that types alone cannot express."""
    _choice(cfg.data.name, sorted(DATASETS), "[data] name")
    _choice(cfg.ensemble.execution, EXECUTIONS, "[ensemble] execution")
    _choice(cfg.ensemble.members_as, FORMS, "[ensemble] members_as")
    cfg.ensemble.form()  # each form's keys checked
    _choice(cfg.likelihood.name, LIKELIHOODS, "[likelihood] name")
    check_backend(cfg.logging, packages=False)  # unknown backend (packages: build_run)
    if cfg.ensemble.members < 1:
        raise UserError(f"[ensemble] members = {cfg.ensemble.members}: must be an integer >= 1")
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    for section, table in raw.items():
        if section not in SECTIONS:
            raise UserError(f"unknown section [{section}]; allowed: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise UserError(f"[{section}] must be a table, got {table!r}")
    plain = {"data": DataConfig, "ensemble": EnsembleConfig, "train": TrainConfig,
             "likelihood": LikelihoodConfig, "logging": LoggingConfig}
    kwargs = {s: from_mapping(cls, raw.get(s, {}), s) for s, cls in plain.items()}
    kwargs["model"] = _named(raw.get("model", {}), MODELS, "model", "mlp")
    kwargs["method"] = _named(raw.get("method", {}), METHODS, "method", "de")
    return validate(Config(**kwargs))


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` → ``(section, key, value)``; value parsed as TOML."""
    lhs, eq, rhs = text.partition("=")
    section, dot, key = lhs.strip().partition(".")
    if not eq or not dot or not key:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. train.lr=0.01")
    try:
        value = tomllib.loads(f"v = {rhs.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs.strip()
    return section, key, value


def read_toml(path: str | Path | None) -> dict[str, Any]:
    """The tables of a TOML file (``{}`` for ``None``); a missing or broken file is a
    :class:`UserError` naming it."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {str(path)!r} is not valid TOML: {err}") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML config (or start from defaults) and apply ``--set`` overrides."""
    raw = read_toml(path)
    if path is not None:  # the file's own paths are relative to the file
        absolute_data_paths(raw, Path(path).expanduser().resolve().parent)
    for text in overrides:
        section, key, value = parse_override(text)
        if section == "data" or (section, key) == ("model", "search_path"):
            # --set paths are relative to the working directory
            fixed = {section: {key: value, **({"name": "custom"} if section == "model" else {})}}
            absolute_data_paths(fixed, Path.cwd())
            value = fixed[section][key]
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"[{section}] must be a table")
        raw[section][key] = value
    model = raw.get("model")
    if isinstance(model, dict) and model.get("name") == "custom" and not model.get("search_path"):
        model["search_path"] = str(Path.cwd())  # a custom model named on the command line only
    if isinstance(model, dict) and model.get("weights") and not model.get("weights_sha256"):
        # the pretrained weights are identified by their SHA-256, recorded in the run's
        # config.toml: a resume or a load refuses a file that changed since
        from diverse.nets.models import weights_digest

        model["weights"] = _absolute(model["weights"], Path.cwd())
        model["weights_sha256"] = weights_digest(model["weights"])
    return config_from_dict(raw)


def _absolute(path: str, base: Path) -> str:
    if not isinstance(path, str) or not path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _absolute_ood(names: Any, base: Path) -> Any:
    if not isinstance(names, list | tuple):
        return names
    return [f"npz:{_absolute(n[4:], base)}" if isinstance(n, str) and n.startswith("npz:")
            else n for n in names]


def absolute_data_paths(raw: dict[str, Any], base: Path) -> None:
    """Make ``[data] path`` and ``npz:PATH`` OOD entries absolute against ``base``, in place.

    A config file's paths are relative to its folder, ``--set`` paths to the working
    directory; the run directory stores them absolute, so a run evaluates from anywhere.
    """
    model = raw.get("model")
    if isinstance(model, dict) and model.get("name") == "custom":
        model["search_path"] = _absolute(model.get("search_path") or ".", base)
        if model.get("weights"):
            model["weights"] = _absolute(model["weights"], base)
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    if "path" in data:
        data["path"] = _absolute(data["path"], base)
    if "ood" in data:
        data["ood"] = _absolute_ood(data["ood"], base)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    def plain(obj: Any) -> Any:
        if isinstance(obj, tuple):
            return [plain(v) for v in obj]
        return obj

    return {
        s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
        for s in SECTIONS
    }


def config_to_toml(cfg: Config) -> str:
    """The resolved config (every key, defaults included) as TOML text."""
    return tomli_w.dumps(config_to_dict(cfg))


def replace(cfg: Config, section: str, **changes: Any) -> Config:
    """A copy of ``cfg`` with keys of one section changed."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                    **changes)})
