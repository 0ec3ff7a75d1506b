"""The posterior study's configuration: ``[study]``, the shared run sections, per-method
overrides, and the run configs they make (:mod:`diverse.app.posterior`)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diverse.app.config import (
    Config,
    config_from_dict,
    from_mapping,
    parse_override,
    read_toml,
)
from diverse.data.ood import OOD_NAMES
from diverse.errors import UserError
from diverse.nets.symmetry import SCALINGS
from diverse.validate import check_choice, check_count

STUDY_METHODS: tuple[str, ...] = ("de", "mc-dropout", "vi", "swag", "sghmc", "laplace", "hmc")
#: The methods of a study whose ``[study] methods`` is not given (HMC is opt-in: slower).
DEFAULT_STUDY_METHODS: tuple[str, ...] = STUDY_METHODS[:-1]
MODES: tuple[str, ...] = ("single", "multi")
RUN_SECTIONS: tuple[str, ...] = ("data", "model", "ensemble", "train", "likelihood")

#: Run sections used where the config has none (a small ReLU MLP, 64-16-10, on digits).
DEFAULT_RUN: dict[str, dict[str, Any]] = {
    "data": {"name": "digits"},
    "model": {"name": "mlp", "hidden": [16], "activation": "relu"},
    "ensemble": {"execution": "vmap"},
    "train": {"epochs": 30, "batch_size": 64, "lr": 0.01, "optimizer": "adam",
              "prior_std": 1.0, "eval_every": 0},
}

#: Per-method overrides where ``[overrides]`` does not list the method: MC dropout
#: needs dropout layers; SWAG collects iterates at a constant learning rate.
DEFAULT_OVERRIDES: dict[str, tuple[str, ...]] = {
    "mc-dropout": ("model.dropout=0.1",),
    "swag": ("train.schedule=constant",),
    "hmc": ("method.leapfrog_steps=16",),
}

FIXED_KEYS = ("ensemble.members", "train.seed", "method.name", "method.predict_samples")
COLUMNS = ("mmd", "mmd_ns", "mmd_hmc", "mmd_hmc_ns", "accuracy", "ece", "ace", "brier", "nll",
           "aupr", "fpr95", "mi_in", "mi_out")
HEADERS = {"mmd": "MMD²", "mmd_ns": "MMD² (NS)", "mmd_hmc": "MMD² to HMC",
           "mmd_hmc_ns": "MMD² to HMC (NS)", "accuracy": "accuracy", "ece": "ECE",
           "ace": "ACE", "brier": "Brier", "nll": "NLL", "aupr": "AUPR", "fpr95": "FPR95",
           "mi_in": "MI in", "mi_out": "MI out"}


@dataclass(frozen=True)
class StudyConfig:
    """The ``[study]`` section.

    Fields:
        methods: methods compared, from :data:`STUDY_METHODS` (default all of them).
        reference: networks in the reference posterior, ≥ 2 (default 1000).
        members: M of the multi-mode forms, ≥ 2 (default 10).
        samples: weight samples per run, a multiple of ``members`` and
            < ``reference`` (default 100).
        seeds: seeds per method and mode, ≥ 1 (default 3).
        scaling: symmetry removal before permutation sorting: ``"min-mass"``
            (default; ReLU/LeakyReLU chains without norm layers), ``"unit-norm"``
            or ``"none"`` (permutations only).
        ood: the OOD set (a :data:`diverse.data.ood.OOD_NAMES` name; default ``"rotated"``).
        reference_seed: ``[train] seed`` of the reference ensemble (default 1000;
            method runs use seeds ``0 .. seeds−1``).
        hmc_reference: also sample a second reference by full-batch HMC
            (:mod:`diverse.methods.hmc`; ``hmc_chains`` chains, ``reference`` draws in all, the
            ``[overrides] hmc`` options) and report every run's MMD² to it, before and
            after symmetry removal (default false).
        hmc_chains: chains of the HMC reference, ≥ 2, dividing ``reference`` (default 10).
    """

    methods: tuple[str, ...] = DEFAULT_STUDY_METHODS
    reference: int = 1000
    members: int = 10
    samples: int = 100
    seeds: int = 3
    scaling: str = "min-mass"
    ood: str = "rotated"
    reference_seed: int = 1000
    hmc_reference: bool = False
    hmc_chains: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.methods, list):  # TOML arrays arrive as lists
            object.__setattr__(self, "methods", tuple(self.methods))
        for name in self.methods:
            check_choice("[study] methods", name, STUDY_METHODS)
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise UserError(f"[study] methods = {list(self.methods)!r}: must be a non-empty "
                            f"list without repeats, from {', '.join(STUDY_METHODS)}")
        check_count("[study] reference", self.reference, 2)
        check_count("[study] members", self.members, 2)
        check_count("[study] samples", self.samples, 2)
        check_count("[study] seeds", self.seeds, 1)
        check_count("[study] reference_seed", self.reference_seed, 0)
        check_choice("[study] scaling", self.scaling, (*SCALINGS, "none"))
        check_choice("[study] ood", self.ood, OOD_NAMES)
        if self.samples % self.members:
            raise UserError(f"[study] samples = {self.samples}: must be a multiple of "
                            f"members = {self.members} (equal draws per member)")
        check_count("[study] hmc_chains", self.hmc_chains, 2)
        if self.hmc_reference and self.reference % self.hmc_chains:
            raise UserError(f"[study] hmc_chains = {self.hmc_chains}: must divide reference = "
                            f"{self.reference} (equal draws per chain)")
        if self.samples >= self.reference:
            raise UserError(f"[study] samples = {self.samples}: must be smaller than "
                            f"reference = {self.reference} (the noise floor splits the reference)")


@dataclass(frozen=True)
class PosteriorConfig:
    """A study: ``[study]``, the shared run sections, per-method overrides.

    Attributes:
        study: the :class:`StudyConfig`.
        run: the run sections ``{section: table}`` (``[data]``, ``[model]``, …)
            after defaults; ``[data] ood`` is set to the study's OOD set.
        overrides: ``{method: ("section.key=value", ...)}`` for every study method.
    """

    study: StudyConfig = field(default_factory=StudyConfig)
    run: dict[str, dict[str, Any]] = field(default_factory=dict)
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)


def posterior_config(raw: dict[str, Any]) -> PosteriorConfig:
    """Parse and check a study's TOML tables (see the module docstring)."""
    allowed = ("study", *RUN_SECTIONS, "overrides")
    for section, table in raw.items():
        if section not in allowed:
            raise UserError(f"unknown section [{section}]; allowed: {', '.join(allowed)}")
        if not isinstance(table, dict):
            raise UserError(f"[{section}] must be a table, got {table!r}")
    study = from_mapping(StudyConfig, raw.get("study", {}), "study")
    run = {s: copy.deepcopy(raw.get(s, DEFAULT_RUN.get(s, {}))) for s in RUN_SECTIONS}
    run["data"]["ood"] = [study.ood]
    given = raw.get("overrides", {})
    for name, changes in given.items():
        if name not in study.methods and not (name == "hmc" and study.hmc_reference):
            raise UserError(f"[overrides] {name!r} is not in [study] methods "
                            f"({', '.join(study.methods)})")
        if not isinstance(changes, list) or not all(isinstance(c, str) for c in changes):
            raise UserError(f"[overrides] {name} = {changes!r}: expected a list of "
                            f"\"section.key=value\" strings")
    overrides = {m: tuple(given.get(m, DEFAULT_OVERRIDES.get(m, ())))
                 for m in (*study.methods, *(("hmc",) if study.hmc_reference else ()))}
    for name, changes in overrides.items():
        for text in changes:
            section, key, _ = parse_override(text)
            where = f"{section}.{key}"
            fixed = where in FIXED_KEYS or section == "data" or (
                section == "model" and key != "dropout")
            if fixed:
                raise UserError(f"[overrides] {name}: {text!r} changes {where}, which the "
                                f"study fixes for every method (data, architecture, members, "
                                f"seeds, sample counts)")
    return PosteriorConfig(study, run, overrides)


def load_posterior_config(path: str | Path | None, overrides: Sequence[str] = ()
                          ) -> PosteriorConfig:
    """Read a study TOML (or start from defaults) and apply ``--set section.key=value``."""
    raw = read_toml(path)
    for text in overrides:
        section, key, value = parse_override(text)
        if section in RUN_SECTIONS and section not in raw:
            raw[section] = copy.deepcopy(DEFAULT_RUN.get(section, {}))
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise UserError(f"[{section}] must be a table")
        table[key] = value
    return posterior_config(raw)


# ------------------------------------------------------------------------ run configs


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study: ``name`` is its folder under ``OUT/runs``."""

    method: str
    mode: str
    seed: int
    members: int
    cfg: Config

    @property
    def name(self) -> str:
        return f"{self.method}-{self.mode}-seed{self.seed}"


def _run_config(pc: PosteriorConfig, method: str, members: int, seed: int,
                draws: int | None, changes: Sequence[str]) -> Config:
    raw = copy.deepcopy(pc.run)
    raw["ensemble"] = {**raw.get("ensemble", {}), "members": members}
    raw["train"] = {**raw.get("train", {}), "seed": seed}
    raw["method"] = {"name": method, **({"predict_samples": draws} if draws else {})}
    for text in changes:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw)


def reference_config(pc: PosteriorConfig) -> Config:
    """The reference ensemble's config: a deep ensemble of ``reference`` networks."""
    return _run_config(pc, "de", pc.study.reference, pc.study.reference_seed, None, ())


def hmc_reference_config(pc: PosteriorConfig) -> Config:
    """The HMC reference's config: ``hmc_chains`` chains of ``reference / hmc_chains`` draws."""
    s = pc.study
    return _run_config(pc, "hmc", s.hmc_chains, s.reference_seed, s.reference // s.hmc_chains,
                       pc.overrides["hmc"])


def run_specs(pc: PosteriorConfig) -> list[RunSpec]:
    """Every run of the study, seed-major (all methods of seed 0 first)."""
    s = pc.study
    specs = []
    for seed in range(s.seeds):
        for method in s.methods:
            for mode in MODES:
                if method == "de" and mode == "single":
                    continue
                members = s.samples if method == "de" else (1 if mode == "single" else s.members)
                draws = None if method == "de" else s.samples // members
                cfg = _run_config(pc, method, members, seed, draws, pc.overrides[method])
                specs.append(RunSpec(method, mode, seed, members, cfg))
    return specs


