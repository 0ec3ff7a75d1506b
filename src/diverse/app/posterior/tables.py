"""The posterior study's results: per-method summaries, the markdown table and the
files of the study folder (:mod:`diverse.app.posterior`)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from diverse.app.posterior.config import COLUMNS, HEADERS, StudyConfig
from diverse.checkpoint import atomic_write_text
from diverse.evaluation.plots import plot_mmd, plot_pca

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

