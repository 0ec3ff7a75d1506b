"""The run report: ``report.md`` with ``plots/*.png`` and an offline
``report.html`` (images embedded), rebuilt from run files.

Reads only what a run directory holds (``config.toml``, ``metrics.json``,
``predictions.npz``, the checkpoint manifest's history), so ``diverse report``
works on any finished run without the model (what needs the model — member
features for CKA, the 2D decision grid — is computed by :mod:`diverse.evaluation.evaluate`
and stored there). Plots: training curves, method diagnostics, reliability
diagram, accuracy vs confidence threshold, the ensemble-size curve, predictive
entropy in- vs out-of-distribution (and for the first 1, M/2 and M members),
member-similarity heatmaps (function-space distance, linear CKA of features),
the test/OOD images with the lowest and highest member disagreement, 2D
decision/uncertainty maps, corruption-severity and rotation curves, and for a
1D regression the predictive mean ± 2 std with the training points.
:func:`write_comparison_report` draws the per-model overlays of ``diverse
compare``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from diverse import rundir
from diverse.checkpoint import atomic_write_text  # noqa: E402
from diverse.errors import UserError  # noqa: E402
from diverse.evaluation.html import markdown_to_html  # noqa: E402
from diverse.evaluation.plots import (  # noqa: E402
    plot_confidence_curves,
    plot_decision_map,
    plot_diagnostics,
    plot_disagreement_examples,
    plot_ensemble_size,
    plot_entropy_by_size,
    plot_entropy_hist,
    plot_entropy_per_model,
    plot_regression_1d,
    plot_reliability,
    plot_reliability_overlay,
    plot_risk_coverage,
    plot_set_sizes,
    plot_shift,
    plot_shift_examples,
    plot_similarity,
    plot_training_curves,
)


def _off_diagonal_mean(matrix: np.ndarray) -> float:
    mask = ~np.eye(len(matrix), dtype=bool)
    return float(np.nanmean(matrix[mask])) if mask.any() else float("nan")


def _matrix(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def _classification_plots(figures: dict[str, Any], arrays: dict[str, np.ndarray], plots: Path
                          ) -> tuple[list[tuple[str, str]], list[str]]:
    """The report's selective-prediction, entropy-by-size, member-similarity,
    disagreement-example and 2D-map figures: ``(images, text lines)``."""
    images: list[tuple[str, str]] = []
    lines: list[str] = []
    probs, labels = arrays["probs"], arrays["labels"]
    curves = {"ensemble": (probs, labels)}
    if probs.shape[0] > 1:
        curves["member 1 alone"] = (probs[:1], labels)
    plot_confidence_curves(curves, plots / "confidence.png")
    images.append(("Accuracy vs confidence threshold", "plots/confidence.png"))
    ood = {k[len("ood_probs_"):]: v for k, v in arrays.items() if k.startswith("ood_probs_")}
    if ood and probs.shape[0] > 1:
        plot_entropy_by_size(probs, ood, plots / "entropy_by_size.png")
        images.append(("Predictive entropy by ensemble size", "plots/entropy_by_size.png"))
    matrices = {}
    if "function_distance" in figures:
        matrices["Function-space distance (mean TV)"] = _matrix(figures["function_distance"])
    if "cka" in figures:
        matrices[f"Linear CKA of features ({figures['cka']['layer']})"] = _matrix(
            figures["cka"]["matrix"])
    if matrices and len(next(iter(matrices.values()))) > 1:
        plot_similarity(matrices, plots / "member_similarity.png")
        images.append(("Member similarity", "plots/member_similarity.png"))
        lines += ["Mean over member pairs: " + ", ".join(
            f"{title} {_off_diagonal_mean(m):.4f}" for title, m in matrices.items()) + ".", ""]
    sets = [("test", "test", probs, labels)] + [
        (f"ood_{name}", f"OOD set {name}", p, None) for name, p in ood.items()]
    for key, title, p, y in sets:
        if f"disagree_{key}_index" not in arrays:
            continue
        index = arrays[f"disagree_{key}_index"]
        predicted = p.mean(0).argmax(-1)[index]
        plot_disagreement_examples(arrays[f"disagree_{key}_images"],
                                   arrays[f"disagree_{key}_value"], predicted,
                                   None if y is None else y[index],
                                   f"{title}: least and most disagreed-on examples "
                                   "(d = fraction of members off the ensemble's class)",
                                   plots / f"disagreement_{key}.png")
        images.append((f"Member disagreement examples: {title}",
                       f"plots/disagreement_{key}.png"))
    if "grid_probs" in arrays:
        plot_decision_map(arrays, plots / "decision_map.png")
        images.append(("Decision and uncertainty map", "plots/decision_map.png"))
    return images, lines


SCORE_LABELS = {"msp": "max prob (MSP)", "max_logit": "max logit", "energy": "energy",
                "entropy": "entropy", "mutual_information": "mutual info",
                "variation_ratio": "variation ratio", "pairwise_kl": "pairwise KL",
                "disagreement": "disagreement"}


def ood_lines(figures: dict[str, Any]) -> list[str]:
    """OOD detection of every score on every set: one score × set matrix per figure
    (AUROC, AUPR-in, AUPR-out, FPR95), near sets first, with the mean per group."""
    by_set = figures.get("ood_scores") or {name: {"entropy": row}
                                           for name, row in figures.get("ood", {}).items()}
    groups = figures.get("ood_groups", {})
    near = sorted(n for n in by_set if groups.get(n) == "near")
    far = sorted(n for n in by_set if groups.get(n) != "near")
    columns = [*near, *(["mean near"] if len(near) > 1 else []),
               *far, *(["mean far"] if len(far) > 1 else [])]
    scores = list(next(iter(by_set.values())))
    lines = ["## Out-of-distribution detection", "",
             "Each OOD set is scored mixed with the in-distribution test set (OOD = positive); "
             "a higher score means more likely OOD. Near sets: "
             f"{', '.join(near) or 'none'}; far: {', '.join(far) or 'none'}. The best value of "
             "each column is in bold.", ""]
    for key, title, best in (("auroc", "AUROC", max), ("aupr_in", "AUPR-in", max),
                             ("aupr_out", "AUPR-out", max), ("fpr95", "FPR95", min)):
        def value(score: str, column: str, key: str = key) -> float:
            if column.startswith("mean "):
                names = near if column == "mean near" else far
                return float(np.mean([by_set[n][score][key] for n in names]))
            return by_set[column][score][key]

        top = {c: best(value(sc, c) for sc in scores) for c in columns}
        header = [f"{c} ({groups.get(c, '–')})" if not c.startswith("mean ") else c
                  for c in columns]
        lines += [f"**{title}**", "", "| score | " + " | ".join(header) + " |",
                  "|---|" + "---|" * len(columns)]
        for score in scores:
            cells = []
            for c in columns:
                text = f"{value(score, c):.4f}"
                cells.append(f"**{text}**" if value(score, c) == top[c] else text)
            lines.append(f"| {SCORE_LABELS.get(score, score)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _scores_of(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    from diverse.math.confidence import uncertainty_scores

    logits = arrays.get("logits")
    return uncertainty_scores(torch.from_numpy(arrays["probs"]),
                              None if logits is None else torch.from_numpy(logits))


def posthoc_sections(figures: dict[str, Any], arrays: dict[str, np.ndarray], plots: Path
                     ) -> tuple[list[tuple[str, str]], list[str]]:
    """Selective classification, temperature scaling and conformal prediction
    (classification), then the other classification figures: ``(images, lines)``."""
    from diverse.evaluation.posthoc import errors_of
    from diverse.math.calibration import apply_temperature

    images: list[tuple[str, str]] = []
    lines: list[str] = []
    probs, labels = arrays["probs"], arrays["labels"]
    if "selective" in figures:
        selective = figures["selective"]
        keys = list(next(iter(selective.values())))
        lines += ["## Selective classification", "",
                  "Reject the most uncertain first; AURC, E-AURC (AURC minus the oracle's) and "
                  "AUGRC (Traub et al. 2024) are lower-better; accuracy at a coverage is that "
                  "of the accepted examples.", "",
                  "| score | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for score, row in selective.items():
            lines.append(f"| {SCORE_LABELS.get(score, score)} | "
                         + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
        lines.append("")
        scores = _scores_of(arrays)
        errors = errors_of(torch.from_numpy(probs), torch.from_numpy(labels)).numpy()
        shown = [k for k in ("msp", "entropy", "mutual_information", "energy") if k in scores]
        plot_risk_coverage({SCORE_LABELS[k]: (scores[k].numpy(), errors) for k in shown},
                           plots / "risk_coverage.png")
        lines += ["![Risk–coverage curves](plots/risk_coverage.png)", ""]
    if "temperature_scaling" in figures:
        scaling = figures["temperature_scaling"]
        lines += ["## Temperature scaling", "",
                  f"Fitted on the validation split ({figures.get('n_validation', '?')} "
                  "examples) by minimizing its NLL; test figures before → after. "
                  "*pooled*: one T on log p̄ (pool-then-calibrate); *members*: one T on every "
                  "sample's logits, then pooled.", "",
                  "| order | T | NLL | ECE | ACE | Brier | accuracy |",
                  "|---|---|---|---|---|---|---|"]
        for mode, row in scaling.items():
            b, a = row["before"], row["after"]
            lines.append(f"| {mode} | {row['temperature']:.4f} | "
                         + " | ".join(f"{b[k]:.4f} → {a[k]:.4f}"
                                      for k in ("nll", "ece", "ace", "brier", "accuracy")) + " |")
        lines.append("")
        curves = {"as trained": (probs, labels)}
        for mode, row in scaling.items():
            if mode == "members" and "logits" not in arrays:
                continue
            after = apply_temperature(row["temperature"], mode, probs=torch.from_numpy(probs),
                                      logits=torch.from_numpy(arrays["logits"])
                                      if "logits" in arrays else None)
            curves[f"{mode} (T = {row['temperature']:.3f})"] = (after.numpy(), labels)
        plot_reliability_overlay(curves, plots / "reliability_scaling.png")
        lines += ["![Reliability before and after temperature scaling]"
                  "(plots/reliability_scaling.png)", ""]
    elif "probs" in arrays:
        lines += ["Post-hoc calibration (temperature scaling, conformal prediction) needs a "
                  "validation split: train with `[data] validation_fraction` (e.g. 0.1).", ""]
    if "conformal" in figures and "sets" in figures["conformal"]:
        conf = figures["conformal"]
        lines += ["## Conformal prediction", "",
                  f"Split conformal, calibrated on {conf['validation_examples']} validation "
                  f"examples (RAPS λ = {conf['raps_lambda']}, k_reg = {conf['raps_k_reg']}; "
                  "APS and RAPS randomized). Coverage should be ≥ 1 − α.", "",
                  "| score | α | target | coverage | worst class | mean set size | empty |",
                  "|---|---|---|---|---|---|---|"]
        for score, table in conf["sets"].items():
            for alpha, row in table.items():
                lines.append(f"| {score.upper()} | {alpha} | {1 - float(alpha):.2f} | "
                             f"{row['coverage']:.4f} | {row['worst_class_coverage']:.4f} | "
                             f"{row['mean_size']:.3f} | {row['empty']:.4f} |")
        lines.append("")
        shown_alpha = "0.1" if "0.1" in next(iter(conf["sets"].values())) else next(
            iter(next(iter(conf["sets"].values()))))
        plot_set_sizes(conf, shown_alpha, plots / "conformal_set_sizes.png")
        lines += ["![Conformal set sizes](plots/conformal_set_sizes.png)", ""]
    more_images, more_lines = _classification_plots(figures, arrays, plots)
    return images + more_images, lines + more_lines


def regression_posthoc_lines(figures: dict[str, Any]) -> list[str]:
    """Std scaling and conformal intervals of a regression run."""
    lines: list[str] = []
    if "std_scaling" in figures:
        row = figures["std_scaling"]
        b, a = row["before"], row["after"]
        lines += ["## Predictive-std scaling", "",
                  f"The mixture scaled about its mean by s = {row['scale']:.4f} (fitted on "
                  f"the validation NLL); test figures before → after.", "",
                  "| NLL | calibration error | mean std |", "|---|---|---|",
                  " | ".join(f"{b[k]:.4f} → {a[k]:.4f}" for k in
                             ("nll", "calibration_error", "mean_std")).join(["| ", " |"]), ""]
    if "conformal" in figures and "intervals" in figures["conformal"]:
        conf = figures["conformal"]
        lines += ["## Conformal intervals", "",
                  f"μ ± q̂ σ from normalized residuals on {conf['validation_examples']} "
                  "validation examples.", "",
                  "| α | target | coverage | mean width |", "|---|---|---|---|"]
        for alpha, row in conf["intervals"].items():
            width = "∞ (too few validation examples)" if row["mean_width"] is None else \
                f"{row['mean_width']:.4f}"
            lines.append(f"| {alpha} | {1 - float(alpha):.2f} | {row['coverage']:.4f} | {width} |")
        lines.append("")
    return lines


def _history(run_dir: Path) -> list[dict[str, Any]]:
    latest = run_dir / "checkpoints" / "latest.json"
    if not latest.is_file():
        return []
    manifest = json.loads((run_dir / "checkpoints" /
                           json.loads(latest.read_text())["manifest"]).read_text())
    return manifest.get("history", [])


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_report(run_dir: Path) -> Path:
    """Render ``report.md`` and ``plots/*.png`` for a finished run."""
    run_dir = Path(run_dir)
    metrics_path = rundir.path(run_dir, rundir.METRICS)
    if not metrics_path.is_file():
        raise UserError(f"{str(metrics_path)!r} does not exist: run `diverse evaluate {run_dir}` "
                        "first")
    figures = rundir.read_json(run_dir, rundir.METRICS)
    arrays = rundir.read_arrays(run_dir, rundir.PREDICTIONS)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    history = _history(run_dir)
    lines = [f"# Run report: `{run_dir.name}`", "",
             f"Method **{figures['method']}**, M = {figures['members']} members, "
             f"data **{figures['dataset']}** ({figures['n_test']} test examples).", ""]
    images: list[tuple[str, str]] = []
    warned = [r for r in history if "warning" in r]
    if warned:
        lines += [f"> **Warning** ({len(warned)} of {len(history)} epochs, first in epoch "
                  f"{warned[0]['epoch']}): {warned[-1]['warning']}.", ""]
    if history:
        plot_training_curves(history, plots / "training_curves.png")
        images.append(("Training curves", "plots/training_curves.png"))
        if plot_diagnostics(history, plots / "diagnostics.png"):
            images.append(("Method diagnostics", "plots/diagnostics.png"))
            last = history[-1]
            if "diag_driving_over_repulsion" in last:
                lines += [f"Driving / repulsive term ratio in the last epoch: "
                          f"{last['diag_driving_over_repulsion']:.3g} "
                          f"(bandwidth {last.get('diag_bandwidth', float('nan')):.3g}, "
                          f"mean kernel {last.get('diag_kernel_mean', float('nan')):.3g}).", ""]
    if "mcmc" in figures:
        mc = figures["mcmc"]
        lines += ["## MCMC diagnostics", "",
                  f"{mc['chains']} chains × {mc['draws']} kept draws; split-R̂ and ESS "
                  f"(BDA3) on {mc['quantities']} predictive quantities f(x) at the test inputs.",
                  "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in mc.items()
                  if k not in ("chains", "draws", "quantities")]
        lines.append("")
    scalar = {k: v for k, v in figures.items()
              if isinstance(v, float) and not k.startswith("member_")}
    lines += ["## Test metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in scalar.items()]
    lines.append("")
    if "member_accuracy" in figures:
        lines += ["Member accuracies: " + ", ".join(f"{a:.4f}" for a in figures["member_accuracy"])
                  + f" (ensemble {figures['accuracy']:.4f}).", ""]
    if "probs" in arrays:
        plot_reliability(arrays["probs"], arrays["labels"], plots / "reliability.png")
        images.append(("Reliability diagram", "plots/reliability.png"))
        if len(figures.get("ensemble_size", {}).get("members", [])) > 1:
            plot_ensemble_size(figures["ensemble_size"], plots / "ensemble_size.png")
            images.append(("Ensemble size", "plots/ensemble_size.png"))
        ood = {k[len("ood_probs_"):]: v for k, v in arrays.items() if k.startswith("ood_probs_")}
        if ood:
            plot_entropy_hist(arrays["probs"], ood, plots / "entropy_ood.png")
            images.append(("Predictive entropy, in- vs out-of-distribution",
                           "plots/entropy_ood.png"))
            lines += ood_lines(figures)
    if "probs" in arrays:
        more_images, more_lines = posthoc_sections(figures, arrays, plots)
        images += more_images
        lines += more_lines
    elif "std_scaling" in figures or "conformal" in figures:
        lines += regression_posthoc_lines(figures)
    if "corruptions" in figures:
        plot_shift(figures, plots / "shift.png")
        images.append(("Corruptions and rotations", "plots/shift.png"))
        if "shift_examples" in arrays:
            plot_shift_examples(arrays["shift_examples"], arrays["shift_names"],
                                plots / "corruption_examples.png")
            images.append(("Corruption examples", "plots/corruption_examples.png"))
        mean = figures["corruptions"]["mean"]
        lines += ["## Corruptions (mean over types)", "",
                  "| severity | accuracy | NLL | ECE |", "|---|---|---|---|"]
        lines += [f"| {s} | {mean[s]['accuracy']:.4f} | {mean[s]['nll']:.4f} | "
                  f"{mean[s]['ece']:.4f} |" for s in sorted(mean, key=int)]
        lines.append("")
    if "training_outliers" in arrays:
        from diverse.data.outliers import outlier_grid

        outlier_grid(torch.from_numpy(arrays["training_outliers"]),
                     plots / "training_outliers.png",
                     title="synthetic outliers as drawn in training")
        images.append(("Synthetic training outliers", "plots/training_outliers.png"))
    inputs = arrays.get("inputs")
    if "probs" not in arrays and inputs is not None and inputs.shape[1:] == (1,):
        plot_regression_1d(arrays, plots / "regression.png")
        images.append(("Predictive mean ± std", "plots/regression.png"))
    for title, rel in images:
        lines += [f"## {title}", "", f"![{title}]({rel})", ""]
    if history:
        lines += ["## History", "", "| epoch | seconds | train loss | held out |",
                  "|---|---|---|---|"]
        for r in history:
            test = ", ".join(f"{k}={v:.4f}" for k, v in r.items()
                             if k.startswith(("test_", "val_")))
            lines.append(f"| {r['epoch']} | {r['seconds']:.1f} | {r['train_loss']:.4f} | {test} |")
        lines.append("")
    config = rundir.path(run_dir, rundir.CONFIG)
    if config.is_file():
        lines += ["## Configuration", "", "```toml", config.read_text().rstrip(), "```", ""]
    path = rundir.path(run_dir, rundir.REPORT)
    markdown = "\n".join(lines)
    atomic_write_text(path, markdown)
    atomic_write_text(run_dir / "report.html",
                      markdown_to_html(markdown, run_dir, f"diverse run {run_dir.name}"))
    return path


def _pooled(run_dirs: list[Path]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]] | None:
    """Ensemble-mean probabilities of several runs (seeds), stacked along the examples.

    Returns ``(probs (1, ΣN, C), labels (ΣN,), {ood set: (1, ΣK, C)})`` (OOD sets
    that every run has), or ``None`` for regression runs.
    """
    probs, labels, ood = [], [], {}
    for run_dir in run_dirs:
        with np.load(rundir.path(run_dir, rundir.PREDICTIONS), allow_pickle=False) as npz:
            if "probs" not in npz.files:
                return None
            probs.append(npz["probs"].mean(0))
            labels.append(npz["labels"])
            for key in npz.files:
                if key.startswith("ood_probs_"):
                    ood.setdefault(key[len("ood_probs_"):], []).append(npz[key].mean(0))
    return (np.concatenate(probs)[None], np.concatenate(labels),
            {k: np.concatenate(v)[None] for k, v in ood.items() if len(v) == len(run_dirs)})


def _similarity_row(run_dirs: list[Path]) -> tuple[float, float]:
    """Mean over seeds of the mean pairwise function distance and CKA (NaN if absent)."""
    distance, cka = [], []
    for run_dir in run_dirs:
        figures = rundir.read_json(run_dir, rundir.METRICS)
        if "function_distance" in figures:
            distance.append(_off_diagonal_mean(_matrix(figures["function_distance"])))
        if "cka" in figures:
            cka.append(_off_diagonal_mean(_matrix(figures["cka"]["matrix"])))
    return (float(np.mean(distance)) if distance else float("nan"),
            float(np.mean(cka)) if cka else float("nan"))


def write_comparison_report(out: Path, runs: dict[str, list[Path]], table: str) -> Path:
    """``OUT/report.md`` and an offline ``OUT/report.html`` for ``diverse compare``.

    ``runs`` maps each config to its run directories (one per seed); ``table``
    is the results table (Markdown). For classification the predictions of all
    seeds of a config are pooled (the ensemble mean of each run, examples
    stacked) and drawn overlaid: reliability curves, accuracy vs confidence
    threshold, and one entropy histogram (test vs OOD) per config; a table gives
    the mean pairwise function-space distance and linear CKA of the members.
    """
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    lines = [f"# Comparison: {', '.join(runs)}", "", table.strip(), ""]
    pooled = {name: p for name, dirs in runs.items() if (p := _pooled(dirs)) is not None}
    images: list[tuple[str, str]] = []
    if pooled:
        curves = {name: (p, y) for name, (p, y, _ood) in pooled.items()}
        plot_reliability_overlay(curves, plots / "reliability.png")
        images.append(("Reliability (seeds pooled)", "plots/reliability.png"))
        plot_confidence_curves(curves, plots / "confidence.png",
                               title="Accuracy vs confidence threshold (seeds pooled)")
        images.append(("Accuracy vs confidence threshold", "plots/confidence.png"))
        from diverse.evaluation.posthoc import errors_of
        from diverse.math.confidence import msp

        plot_risk_coverage(
            {name: (msp(torch.from_numpy(p)).numpy(),
                    errors_of(torch.from_numpy(p), torch.from_numpy(y)).numpy())
             for name, (p, y) in curves.items()},
            plots / "risk_coverage.png", title="Risk–coverage, rejecting by MSP (seeds pooled)")
        images.append(("Risk–coverage (MSP)", "plots/risk_coverage.png"))
        with_ood = {name: (p, ood) for name, (p, _y, ood) in pooled.items() if ood}
        if with_ood:
            plot_entropy_per_model(with_ood, plots / "entropy_ood.png")
            images.append(("Predictive entropy per config, in- vs out-of-distribution",
                           "plots/entropy_ood.png"))
        lines += ["## Member similarity (mean over member pairs and seeds)", "",
                  "| config | function-space distance (TV) | linear CKA of features |",
                  "|---|---|---|"]
        for name in pooled:
            distance, cka = _similarity_row(runs[name])
            lines.append(f"| {name} | {distance:.4f} | {cka:.4f} |")
        lines.append("")
    for title, rel in images:
        lines += [f"## {title}", "", f"![{title}]({rel})", ""]
    markdown = "\n".join(lines)
    path = rundir.path(out, rundir.REPORT)
    atomic_write_text(path, markdown)
    atomic_write_text(out / "report.html",
                      markdown_to_html(markdown, out, f"diverse comparison {out.name}"))
    return path
