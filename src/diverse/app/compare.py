"""``diverse compare``: several configs × seeds, one table.

Each (config, seed) is a run directory ``OUT/<config stem>/seed-<k>`` trained
with ``[train] seed = k``. A finished run (it has ``metrics.json``) is reused,
an interrupted one (it has a checkpoint) resumes, others start — so the whole
comparison resumes after a crash. The results go to ``OUT/results.csv`` (one
row per run) and ``OUT/results.md`` (mean ± std over seeds per config, the best
mean per column in bold: higher is better for accuracy and AUROC/AUPR, lower
for the rest; diversity columns and ``train_seconds``, the training wall time,
are not ranked). A finished run whose config differs only in ``[data] ood``
is evaluated again with the new OOD sets instead of being retrained.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diverse import rundir
from diverse.app.config import Config, config_to_dict, config_to_toml, load_config, replace
from diverse.checkpoint import atomic_write_text
from diverse.errors import UserError
from diverse.evaluation.report import write_comparison_report

HIGHER_IS_BETTER = ("accuracy", "auroc", "aupr", "ess")
# member diversity and uncertainty: neither direction is "better" for every method
DESCRIPTIVE = ("mutual_information", "disagreement", "cka", "train_seconds", "coverage",
               "worst_class_coverage", "temperature", "std_scale", "accept_rate")
COLUMNS = ("accuracy", "nll", "ece", "ace", "brier", "mutual_information", "disagreement",
           "rmse", "calibration_error")


# keys that change what is evaluated, never what is trained (OOD sets are built
# from the test inputs with their own seeded generators)
EVALUATION_ONLY = (("data", "ood"), ("data", "near_ood"), ("method", "predict_members"))


def _training_part(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config without its :data:`EVALUATION_ONLY` keys."""
    out = {section: dict(values) if isinstance(values, dict) else values
           for section, values in config.items()}
    for section, key in EVALUATION_ONLY:
        out.get(section, {}).pop(key, None)
    return out


def run_to_completion(cfg: Config, run_dir: Path, finish: Callable[[Any, Path], None],
                      show_progress: bool) -> str:
    """Reuse, re-evaluate, resume or start the run in ``run_dir``; returns what it did.

    A finished run whose config differs only in :data:`EVALUATION_ONLY` keys
    (e.g. an OOD set added to ``[data] ood``) is evaluated again, not
    retrained; any other difference is refused.
    """
    from diverse.app.train import build_run, load_trained, train, write_run_config

    saved = rundir.path(run_dir, rundir.CONFIG)
    # compared as resolved configs: keys added to the package since (with their
    # defaults) do not make an old run different
    if saved.is_file():
        old, new = config_to_dict(load_config(saved)), config_to_dict(cfg)
        if old != new:
            if _training_part(old) != _training_part(new):
                raise UserError(f"{str(run_dir)!r} holds a run of a different config (its "
                                "config.toml differs); use another --out or remove that run")
            # metrics first: a crash below leaves a run that is evaluated again, never
            # one whose figures belong to the old OOD sets
            finished = rundir.has(run_dir, rundir.METRICS)
            rundir.remove(run_dir, rundir.METRICS)
            atomic_write_text(saved, config_to_toml(cfg))
            if finished:
                finish(load_trained(run_dir, cfg), run_dir)
                return "re-evaluated"
    if rundir.has(run_dir, rundir.METRICS):
        return "reused"
    run = build_run(cfg)
    resume = (run_dir / "checkpoints" / "latest.json").is_file()
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, cfg)
    train(run, run_dir, resume=resume, show_progress=show_progress)
    finish(run, run_dir)
    return "resumed" if resume else "trained"


def train_seconds(run_dir: Path) -> float | None:
    """Training wall time of a run: the sum of its history's epoch ``seconds``.

    Read from the newest checkpoint manifest (a resumed run counts each epoch
    once); ``None`` when the run has no readable checkpoint.
    """
    folder = Path(run_dir) / "checkpoints"
    try:
        name = json.loads((folder / "latest.json").read_text())["manifest"]
        history = json.loads((folder / name).read_text())["history"]
        return float(sum(r["seconds"] for r in history))
    except (OSError, KeyError, TypeError, ValueError):
        return None


def flat_row(figures: dict[str, Any]) -> dict[str, float]:
    """The scalar figures of one run.

    OOD figures as ``auroc[set]`` (predictive entropy, the headline score) and
    ``auroc[set/score]`` for every score; selective classification as
    ``aurc[score]``, ``e_aurc[score]``, ``augrc[score]``, ``accuracy_at_90[score]``
    …; temperature scaling as ``temperature[mode]``, ``nll[ts_mode]``,
    ``ece[ts_mode]``; conformal sets as ``coverage[score@α]``,
    ``worst_class_coverage[score@α]``, ``set_size[score@α]`` (regression:
    ``coverage[interval@α]``, ``width[interval@α]``).
    """
    row = {k: figures[k] for k in COLUMNS if isinstance(figures.get(k), float)}
    for name, table in figures.get("ood", {}).items():
        for key in ("auroc", "aupr_out", "fpr95"):
            row[f"{key}[{name}]"] = table[key]
    for layer, cka in figures.get("cka", {}).get("layers", {}).items():
        row[f"cka[{layer}]"] = cka["mean"]  # mean pairwise CKA between members
    for name, by_score in figures.get("ood_scores", {}).items():
        for score, table in by_score.items():
            row[f"auroc[{name}/{score}]"] = table["auroc"]
    for score, table in figures.get("selective", {}).items():
        for key, value in table.items():
            row[f"{key}[{score}]"] = value
    for mode, table in figures.get("temperature_scaling", {}).items():
        row[f"temperature[{mode}]"] = table["temperature"]
        for key in ("nll", "ece"):
            row[f"{key}[ts_{mode}]"] = table["after"][key]
    if "std_scaling" in figures:
        row["std_scale"] = figures["std_scaling"]["scale"]
        row["nll[std_scaled]"] = figures["std_scaling"]["after"]["nll"]
    for key in ("rhat_max", "ess_min", "divergences", "accept_rate"):
        if key in figures.get("mcmc", {}):
            row[key] = float(figures["mcmc"][key])
    conformal = figures.get("conformal", {})
    for score, table in conformal.get("sets", {}).items():
        for alpha, cell in table.items():
            row[f"coverage[{score}@{alpha}]"] = cell["coverage"]
            row[f"worst_class_coverage[{score}@{alpha}]"] = cell["worst_class_coverage"]
            row[f"set_size[{score}@{alpha}]"] = cell["mean_size"]
    for alpha, cell in conformal.get("intervals", {}).items():
        row[f"coverage[interval@{alpha}]"] = cell["coverage"]
        if cell["mean_width"] is not None:
            row[f"width[interval@{alpha}]"] = cell["mean_width"]
    return row


#: The post-hoc columns of the main table; the rest have a table of their own.
MAIN_POSTHOC = ("aurc[msp]", "e_aurc[msp]", "augrc[msp]", "nll[ts_pooled]", "ece[ts_pooled]",
                "coverage[aps@0.1]", "set_size[aps@0.1]", "coverage[interval@0.1]",
                "width[interval@0.1]")
_POSTHOC_PREFIXES = ("aurc[", "e_aurc[", "augrc[", "accuracy_at_", "temperature[", "nll[ts_",
                     "ece[ts_", "std_scale", "nll[std_", "coverage[", "worst_class_coverage[",
                     "set_size[", "width[")
#: ``(title, is_column)`` of the tables after the main one in ``results.md`` (every column
#: is in ``results.csv``; accuracy at a coverage is tabulated for MSP only).
TABLES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("OOD detection: AUROC of every score (test set mixed with the OOD set)",
     lambda c: c.startswith("auroc[") and "/" in c),
    ("Selective classification: AURC by score", lambda c: c.startswith("aurc[")),
    ("Selective classification: E-AURC by score", lambda c: c.startswith("e_aurc[")),
    ("Selective classification: AUGRC by score", lambda c: c.startswith("augrc[")),
    ("Selective classification: accuracy at 50/80/90/95% coverage (rejecting by MSP)",
     lambda c: c.startswith("accuracy_at_") and c.endswith("[msp]")),
    ("Post-hoc calibration on the validation split",
     lambda c: c.startswith(("temperature[", "nll[ts_", "ece[ts_", "std_scale", "nll[std_"))),
    ("Conformal prediction (split conformal on the validation split)",
     lambda c: c.startswith(("coverage[", "worst_class_coverage[", "set_size[", "width["))),
)


def main_column(column: str) -> bool:
    """Whether a column belongs to the main table of ``results.md``."""
    if column in MAIN_POSTHOC:
        return True
    return not column.startswith(_POSTHOC_PREFIXES) and not (
        column.startswith("auroc[") and "/" in column)


def _better(column: str) -> Callable[[float, float], bool] | None:
    """How two means of a column compare; ``None`` for descriptive columns (no "best")."""
    if column.split("[")[0].startswith(DESCRIPTIVE):
        return None
    if column.split("[")[0].startswith(HIGHER_IS_BETTER):
        return lambda a, b: a > b
    return lambda a, b: a < b


def summary_table(rows: list[dict[str, Any]],
                  keep: Callable[[str], bool] = lambda _column: True) -> str:
    """Markdown: mean ± std over seeds per config, best mean per column in bold.

    ``keep`` selects the columns (default: all).
    """
    configs = list(dict.fromkeys(r["config"] for r in rows))
    columns = [c for c in dict.fromkeys(k for r in rows for k in r)
               if c not in ("config", "seed", "run_dir") and keep(c)]
    stats: dict[str, dict[str, tuple[float, float]]] = {}
    for name in configs:
        stats[name] = {}
        for column in columns:
            values = [r[column] for r in rows if r["config"] == name and column in r]
            if values:
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
                stats[name][column] = (mean, math.sqrt(var))
    best = {}
    for column in columns:
        better = _better(column)
        if better is None:
            continue
        for name in configs:
            if column in stats[name] and (column not in best or better(
                    stats[name][column][0], stats[best[column]][column][0])):
                best[column] = name
    seeds = {name: sum(r["config"] == name for r in rows) for name in configs}
    lines = ["| config | seeds | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for name in configs:
        cells = []
        for column in columns:
            if column not in stats[name]:
                cells.append("–")
                continue
            mean, std = stats[name][column]
            text = f"{mean:.4f} ± {std:.4f}"
            cells.append(f"**{text}**" if best.get(column) == name else text)
        lines.append(f"| {name} | {seeds[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(configs: Sequence[str], seeds: int, out: Path, overrides: Sequence[str],
            finish: Callable[[Any, Path], None], show_progress: bool = True) -> Path:
    """Run (or reuse) every config × seed and write ``results.csv`` and ``results.md``."""
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: must be >= 1")
    stems = [Path(c).stem for c in configs]
    if len(set(stems)) != len(stems):
        raise UserError(f"config names must differ (they name the run folders): {stems}")
    loaded = [(Path(c).stem, load_config(c, overrides)) for c in configs]  # all validated first
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    total = len(loaded) * seeds
    for i, (stem, cfg) in enumerate(loaded):
        for seed in range(seeds):
            run_dir = out / stem / f"seed-{seed}"
            what = run_to_completion(replace(cfg, "train", seed=seed), run_dir, finish,
                                     show_progress)
            if show_progress:
                print(f"[{i * seeds + seed + 1}/{total}] {stem} seed {seed}: {what}", flush=True)
            figures = rundir.read_json(run_dir, rundir.METRICS)
            seconds = train_seconds(run_dir)
            rows.append({"config": stem, "seed": seed, "run_dir": str(run_dir),
                         **flat_row(figures),
                         **({} if seconds is None else {"train_seconds": seconds})})
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buffer.getvalue())
    table = summary_table(rows, main_column)
    for title, is_column in TABLES:
        if any(is_column(c) for c in columns):
            table += f"\n### {title}\n\n" + summary_table(rows, is_column)
    atomic_write_text(out / "results.md", f"# Comparison ({seeds} seeds)\n\n{table}")
    runs: dict[str, list[Path]] = {}
    for r in rows:
        runs.setdefault(r["config"], []).append(Path(r["run_dir"]))
    write_comparison_report(out, runs, table)
    return out / "results.md"
