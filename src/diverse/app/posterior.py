"""``diverse posterior``: the symmetry-aware posterior study on a small network.

Laurent, Aldea & Franchi, "A symmetry-aware exploration of Bayesian neural
network posteriors" (ICLR 2024). Protocol:

1. **Reference posterior**: ``reference`` networks (default 1000) trained
   independently from their own initializations — one vectorized deep
   ensemble with ``[train] seed = reference_seed``, checkpointed in
   ``OUT/reference`` and reused (or resumed) on the next call.
2. **Methods**: every method of ``methods`` in its single-mode form (M = 1)
   and multi-mode form (M = ``members``), for ``seeds`` seeds (``[train] seed``
   0, 1, …). Every run yields the same number of weight samples, ``samples``
   (a fair MMD): ``samples / M`` draws per member (:mod:`diverse.nets.samples`).
   A deep ensemble is multi-mode only and has ``samples`` members (one
   network has no spread). Runs live in ``OUT/runs/<method>-<mode>-seed<k>``;
   a finished run (``row.json``) is reused, an interrupted one resumes.
3. **MMD** (:func:`diverse.math.mmd.mmd`, mean MMD² over Gaussian and Laplace
   kernels × 10 bandwidths) between a run's flattened weight samples and the
   reference, before and after symmetry removal
   (:func:`diverse.nets.symmetry.remove_symmetries`, ``scaling`` then canonical
   permutation, applied to both sides). The noise floor is the MMD between
   ``samples`` reference networks and the other ``reference − samples``.
4. **Uncertainty**: accuracy, ECE, ACE, Brier, NLL on the test set; AUPR
   (OOD as positive) and FPR95 with the predictive entropy as score against
   the ``ood`` set; mean mutual information in- and out-of-distribution.

Outputs in ``OUT``: ``results.csv`` (one row per run), ``results.md`` and
``results.html`` (mean ± std over seeds per method and mode, sample std),
``plots/pca.png`` (held-out reference networks and seed-0 samples projected on
the reference's first two principal components, before and after symmetry
removal) and
``plots/mmd.png`` (MMD per method and mode, before/after).

Config (TOML, every key optional): ``[study]`` (:class:`StudyConfig`), the run
sections ``[data]``, ``[model]``, ``[ensemble]``, ``[train]``, ``[likelihood]``
shared by the reference and every method (a section given replaces the
default section of :data:`DEFAULT_RUN` as a whole), and ``[overrides]``:
per method a list of ``"section.key=value"`` changes for that method's runs
(e.g. its ``[method]`` options, or ``model.dropout`` for MC dropout), default
:data:`DEFAULT_OVERRIDES` for methods not listed. Overrides may not change the
data, the architecture (``model.*`` except ``dropout``), ``ensemble.members``,
``train.seed`` or ``method.name``/``predict_samples``: those define the
comparison.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from diverse import metrics, rundir
from diverse.app.config import (
    Config,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    from_mapping,
    parse_override,
    read_toml,
)
from diverse.checkpoint import atomic_save_tensors, atomic_write_json, atomic_write_text
from diverse.data.ood import OOD_NAMES
from diverse.errors import UserError
from diverse.math.mmd import mmd
from diverse.nets.samples import (
    Samples,
    base_model,
    collect_members,
    flatten,
    has_samples,
    load_samples,
    save_samples,
)
from diverse.nets.symmetry import SCALINGS, canonical_scaling, remove_symmetries
from diverse.progress import Progress
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

MODE_COLORS = {"single": "tab:orange", "multi": "tab:blue"}
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


# ----------------------------------------------------------------------------- running


def _same_config(run_dir: Path, cfg: Config) -> bool:
    path = rundir.path(run_dir, rundir.CONFIG)
    return not path.exists() or path.read_text() == config_to_toml(cfg)


def train_or_reuse(cfg: Config, run_dir: Path, dataset: Any, show_progress: bool
                   ) -> tuple[Any, Samples]:
    """Train (or resume) the run in ``run_dir`` to its weight samples; reuse finished ones.

    Returns ``(run, samples)``; a deep ensemble's members are saved as its samples.
    A folder holding a run of another config is a UserError.
    """
    from diverse.app.train import build_run, load_trained, train

    if not _same_config(run_dir, cfg):
        raise UserError(f"{str(run_dir)!r} holds a run with another config; delete it or "
                        f"choose another --out")
    if has_samples(run_dir) and (run_dir / "checkpoints" / "latest.json").is_file():
        run = load_trained(run_dir, cfg, dataset)
        samples, _ = load_samples(run_dir, run.device)
        return run, samples
    run = build_run(cfg, dataset)
    resume = (run_dir / "checkpoints" / "latest.json").is_file()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        rundir.write_text(run_dir, rundir.CONFIG, config_to_toml(cfg))
    train(run, run_dir, resume=resume, show_progress=show_progress)
    if run.samples is None:  # deep ensemble: the members are the samples
        skeleton = base_model(cfg, run.dataset, run.likelihood)
        run.samples = collect_members(skeleton, run.ensemble.params, run.ensemble.member_buffers)
        save_samples(run_dir, run.samples, cfg.method.name, config_to_dict(cfg))
    return run, run.samples


def canonical(skeleton: nn.Module, samples: Samples, scaling: str) -> Tensor:
    """``(S, D)`` flattened weights after symmetry removal (``scaling``, then sorting).

    The min-mass solver occasionally stops a hair above its gradient tolerance
    (SciPy's trust-ncg at the limit of float64 precision) and raises; such a
    sample is solved again from its unit-norm rescaling, a different point of
    the same scaling orbit, whose min-mass representative is the same (the
    minimum over the orbit is unique).
    """
    state = {**samples.params, **samples.buffers}
    try:
        out = remove_symmetries(skeleton, state, scaling)
    except RuntimeError:
        if scaling != "min-mass":
            raise
        parts = []
        for i in range(samples.count):
            one = {k: v[i:i + 1] for k, v in state.items()}
            try:
                parts.append(remove_symmetries(skeleton, one, scaling))
            except RuntimeError:
                start = canonical_scaling(skeleton, one, "unit-norm")
                parts.append(remove_symmetries(skeleton, start, scaling))
        out = {k: torch.cat([p[k] for p in parts]) for k in state}
    return flatten(Samples({k: out[k] for k in samples.params}, {}, samples.member), skeleton)


def uncertainty_row(run: Any, ood: str) -> dict[str, float]:
    """Test-set and OOD figures of a run through its predictive samples."""
    from diverse.app.train import predict_run

    data = run.dataset
    probs = predict_run(run, data.x_test)["probs"]
    probs_out = predict_run(run, data.ood[ood])["probs"]
    fig = metrics.classification_metrics(probs, data.y_test)
    detect = metrics.ood_metrics(probs, probs_out, score="entropy")
    return {"accuracy": fig["accuracy"], "ece": fig["ece"], "ace": fig["ace"],
            "brier": fig["brier"], "nll": fig["nll"], "aupr": detect["aupr_out"],
            "fpr95": detect["fpr95"], "mi_in": fig["mutual_information"],
            "mi_out": float(metrics.mutual_information(probs_out).mean())}


def mmd_value(x: Tensor, y: Tensor) -> float:
    """The aggregate MMD² (:func:`diverse.math.mmd.mmd`) of two weight samples, in float64."""
    return float(mmd(x.double().cpu(), y.double().cpu())["aggregate"])


def _reference(pc: PosteriorConfig, out: Path, dataset: Any, show: bool
               ) -> tuple[nn.Module, Tensor, Tensor]:
    """The reference's skeleton and flattened weights ``(R, D)`` before and after removal."""
    cfg = reference_config(pc)
    folder = out / "reference"
    run, samples = train_or_reuse(cfg, folder, dataset, show)
    skeleton = base_model(cfg, run.dataset, run.likelihood)
    return skeleton, flatten(samples, skeleton).cpu(), _canonical_cached(
        folder, skeleton, samples, pc.study.scaling)


def _canonical_cached(folder: Path, skeleton: nn.Module, samples: Samples, scaling: str
                      ) -> Tensor:
    """:func:`canonical` of a reference's samples, cached in ``folder``."""
    cache = folder / f"canonical-{scaling}.safetensors"
    if cache.is_file():
        return load_file(cache)["weights"]
    canon = canonical(skeleton, samples.to("cpu"), scaling)
    atomic_save_tensors(cache, {"weights": canon}, {"scaling": scaling})
    return canon


def _hmc_reference(pc: PosteriorConfig, out: Path, dataset: Any, skeleton: nn.Module,
                   show: bool) -> tuple[Tensor, Tensor]:
    """The HMC reference's flattened samples ``(R, D)`` before and after symmetry removal."""
    folder = out / "hmc-reference"
    _run, samples = train_or_reuse(hmc_reference_config(pc), folder, dataset, show)
    return flatten(samples, skeleton).cpu(), _canonical_cached(folder, skeleton, samples,
                                                               pc.study.scaling)


def _check_study(pc: PosteriorConfig, specs: list[RunSpec], dataset: Any) -> None:
    """Fail before any training: data kind, OOD set, symmetry removal, every run's build."""
    from diverse.app.train import build_run

    if dataset.task != "classification":
        raise UserError(f"[data] name = {dataset.name!r}: the posterior study needs a "
                        f"classification data set")
    seen = set()
    for spec in specs:
        if (spec.method, spec.mode) not in seen:
            seen.add((spec.method, spec.mode))
            build_run(spec.cfg, dataset)  # wrappers and method options fail here
    if pc.study.hmc_reference:
        build_run(hmc_reference_config(pc), dataset)
    ref = reference_config(pc)
    run = build_run(_run_config(pc, "de", 1, 0, None, ()), dataset)
    skeleton = base_model(ref, dataset, run.likelihood)
    remove_symmetries(skeleton, {k: v.detach() for k, v in run.ensemble.params.items()},
                      pc.study.scaling)


def run_study(pc: PosteriorConfig, out: Path, show_progress: bool = True) -> Path:
    """Run (or resume) the whole study into ``out``; returns ``out/results.md``."""
    from diverse.data.datasets import load_dataset

    s = pc.study
    specs = run_specs(pc)
    dataset = load_dataset(reference_config(pc).data)
    _check_study(pc, specs, dataset)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(
        {"study": asdict(s), "run": pc.run, "overrides": pc.overrides}, indent=2) + "\n")
    skeleton, ref_flat, ref_canon = _reference(pc, out, dataset, show_progress)
    floor = {"mmd": mmd_value(ref_flat[:s.samples], ref_flat[s.samples:]),
             "mmd_ns": mmd_value(ref_canon[:s.samples], ref_canon[s.samples:])}
    hmc = _hmc_reference(pc, out, dataset, skeleton, show_progress) if s.hmc_reference else None
    if hmc is not None:  # the trained reference against HMC: how far apart the two are
        floor.update(reference_to_hmc=mmd_value(ref_flat, hmc[0]),
                     reference_to_hmc_ns=mmd_value(ref_canon, hmc[1]))
    bar = Progress(len(specs), "posterior study", enabled=show_progress)
    rows, projections = [], {}
    for i, spec in enumerate(specs):
        run_dir = out / "runs" / spec.name
        row_path = run_dir / "row.json"
        reuse = row_path.is_file() and has_samples(run_dir) and _same_config(run_dir, spec.cfg)
        if reuse and spec.seed > 0:  # seed 0's samples are needed again for the plots
            rows.append(json.loads(row_path.read_text()))
        else:
            run, samples = train_or_reuse(spec.cfg, run_dir, dataset, False)
            samples = samples.to("cpu")
            flat = flatten(samples, skeleton)
            canon = canonical(skeleton, samples, s.scaling)
            projections[(spec.method, spec.mode)] = (flat, canon)
            if reuse:
                rows.append(json.loads(row_path.read_text()))
            else:
                row = {"method": spec.method, "mode": spec.mode, "seed": spec.seed,
                       "members": spec.members, "samples": samples.count,
                       "mmd": mmd_value(flat, ref_flat), "mmd_ns": mmd_value(canon, ref_canon),
                       **uncertainty_row(run, s.ood)}
                if hmc is not None:
                    row.update(mmd_hmc=mmd_value(flat, hmc[0]),
                               mmd_hmc_ns=mmd_value(canon, hmc[1]))
                atomic_write_json(row_path, row)
                rows.append(row)
        bar.update(i + 1, run=spec.name, mmd=rows[-1]["mmd"])
    bar.close()
    return write_results(out, rows, floor, ref_flat, ref_canon, projections, s)


# ------------------------------------------------------------------------------ output


def present_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The :data:`COLUMNS` every row has (the HMC columns only with an HMC reference)."""
    return [c for c in COLUMNS if all(c in r for r in rows)]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per (method, mode): ``{column: (mean, std, n)}``."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["mode"]), []).append(row)
    out = []
    for (method, mode), group in groups.items():
        entry: dict[str, Any] = {"method": method, "mode": mode, "seeds": len(group)}
        for col in present_columns(group):
            values = np.array([r[col] for r in group], dtype=float)
            std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            entry[col] = (float(values.mean()), std)
        out.append(entry)
    return out


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def results_markdown(summary: list[dict[str, Any]], floor: dict[str, float],
                     study: StudyConfig) -> str:
    """The study's table (mean ± std over seeds) and its legend, as Markdown."""
    columns = [c for c in COLUMNS if summary and all(c in e for e in summary)]
    head = ["method", "mode", "seeds", *(HEADERS[c] for c in columns)]
    lines = [
        "# Posterior study",
        "",
        f"Reference: {study.reference} independently trained networks; {study.samples} weight "
        f"samples per run; multi-mode M = {study.members} (deep ensembles: {study.samples} "
        f"members); {study.seeds} seed(s); symmetry removal: {study.scaling}; OOD set: "
        f"{study.ood}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for e in summary:
        cells = [e["method"], e["mode"], str(e["seeds"]), *(_fmt(*e[c]) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Noise floor (MMD² of {study.samples} reference networks against the other "
        f"{study.reference - study.samples}): {floor['mmd']:.4f} before, {floor['mmd_ns']:.4f} "
        f"after symmetry removal."
        + (f" HMC reference ({study.hmc_chains} chains, {study.reference} draws): MMD² of the "
           f"trained reference to it {floor['reference_to_hmc']:.4f} before, "
           f"{floor['reference_to_hmc_ns']:.4f} after symmetry removal."
           if "reference_to_hmc" in floor else ""),
        "",
        "MMD²: mean over Gaussian and Laplace kernels × 10 bandwidths of the unbiased MMD² to "
        "the reference (NS: after symmetry removal). AUPR (OOD positive) and FPR95 use the "
        "predictive entropy; MI: mean mutual information on the test and OOD sets. "
        "± is the sample standard deviation over seeds.",
        "",
        "![MMD per method](plots/mmd.png)",
        "",
        "![Weight samples, PCA of the reference](plots/pca.png)",
        "",
    ]
    return "\n".join(lines)


def _pca_basis(ref: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and first two principal directions ``(D, 2)`` of ``ref``, float64."""
    mean = ref.double().mean(0)
    _, _, v = torch.linalg.svd(ref.double() - mean, full_matrices=False)
    return mean, v[:2].T


def plot_pca(ref_flat: Tensor, ref_canon: Tensor,
             projections: dict[tuple[str, str], tuple[Tensor, Tensor]], path: Path) -> None:
    """Per method: reference and seed-0 samples on the reference's first two PCs.

    The principal directions come from the even-indexed reference networks and
    the odd-indexed ones are drawn: directions fitted on a point set exaggerate
    that set's own spread (D is about the number of networks), so the drawn
    reference is held out like the methods' samples.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for m, _ in projections))
    fig, axes = plt.subplots(len(methods), 2, figsize=(9, 3.2 * len(methods)), squeeze=False)
    bases = [_pca_basis(ref_flat[0::2]), _pca_basis(ref_canon[0::2])]
    for row, method in enumerate(methods):
        for col, (title, ref) in enumerate((("before", ref_flat), ("after symmetry removal",
                                                                   ref_canon))):
            mean, basis = bases[col]
            ax = axes[row][col]
            pts = ((ref[1::2].double() - mean) @ basis).numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=4, c="0.75", label="reference")
            for mode in MODES:
                if (method, mode) in projections:
                    x = projections[(method, mode)][col].double()
                    p = ((x - mean) @ basis).numpy()
                    ax.scatter(p[:, 0], p[:, 1], s=6, c=MODE_COLORS[mode],
                               label=f"{mode}-mode")
            ax.set_title(f"{method}: {title}", fontsize=9)
            ax.set_xlabel("PC 1")
            ax.set_ylabel("PC 2")
            ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_mmd(summary: list[dict[str, Any]], floor: dict[str, float], path: Path) -> None:
    """Bars of MMD² per method (single vs multi), before and after symmetry removal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(e["method"] for e in summary))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.38
    for ax, col, title in ((axes[0], "mmd", "MMD² to the reference"),
                           (axes[1], "mmd_ns", "MMD² after symmetry removal")):
        for k, mode in enumerate(MODES):
            xs, means, stds = [], [], []
            for i, method in enumerate(methods):
                entry = next((e for e in summary if e["method"] == method and e["mode"] == mode),
                             None)
                if entry is not None:
                    xs.append(i + (k - 0.5) * width)
                    means.append(entry[col][0])
                    stds.append(0.0 if math.isnan(entry[col][1]) else entry[col][1])
            ax.bar(xs, means, width, yerr=stds, label=f"{mode}-mode", capsize=2,
                   color=MODE_COLORS[mode])
        ax.axhline(floor[col], color="k", ls="--", lw=1, label="noise floor")
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_results(out: Path, rows: list[dict[str, Any]], floor: dict[str, float],
                  ref_flat: Tensor, ref_canon: Tensor,
                  projections: dict[tuple[str, str], tuple[Tensor, Tensor]],
                  study: StudyConfig) -> Path:
    """``results.csv``, ``results.md``, ``results.html`` and ``plots/`` in ``out``."""
    from diverse.evaluation.html import markdown_to_html

    buffer = io.StringIO()
    keys = ["method", "mode", "seed", "members", "samples", *present_columns(rows)]
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buffer.getvalue())
    summary = summarize(rows)
    (out / "plots").mkdir(exist_ok=True)
    plot_mmd(summary, floor, out / "plots" / "mmd.png")
    plot_pca(ref_flat, ref_canon, projections, out / "plots" / "pca.png")
    md = results_markdown(summary, floor, study)
    atomic_write_text(out / "results.md", md)
    atomic_write_text(out / "results.html", markdown_to_html(md, out, "Posterior study"))
    return out / "results.md"

