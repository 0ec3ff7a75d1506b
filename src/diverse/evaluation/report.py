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
import os
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from diverse import rundir
from diverse.checkpoint import atomic_write_text, publish  # noqa: E402
from diverse.errors import UserError  # noqa: E402
from diverse.evaluation.html import markdown_to_html  # noqa: E402
from diverse.math import metrics  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    publish(tmp, path)


def plot_training_curves(history: list[dict[str, Any]], path: Path) -> None:
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    split = "val" if any("val_nll" in r for r in history) else "test"
    axes[0].plot(epochs, [r["train_loss"] for r in history], "o-",
                 label="train objective (the method's)")
    if "train_nll" in history[0]:
        axes[0].plot(epochs, [r["train_nll"] for r in history], "^-", label="train NLL (members)")
    test = [(r["epoch"], r[f"{split}_nll"]) for r in history if f"{split}_nll" in r]
    if test:
        axes[0].plot(*zip(*test, strict=True), "s-", label=f"{split} NLL (ensemble)")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper right")  # "best" is slow (and warns) on long histories
    key, test_key, label = (("train_accuracy", f"{split}_accuracy", "accuracy")
                            if "train_accuracy" in history[0]
                            else ("train_neg_mse", f"{split}_rmse", "−MSE / RMSE"))
    axes[1].plot(epochs, [r[key] for r in history], "o-", label=f"train ({key})")
    test = [(r["epoch"], r[test_key]) for r in history if test_key in r]
    if test:
        axes[1].plot(*zip(*test, strict=True), "s-", label=f"test ({test_key})")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel(label)
    axes[1].legend(loc="lower right")
    fig.suptitle("Training curves")
    _save(fig, path)


def plot_diagnostics(history: list[dict[str, Any]], path: Path) -> bool:
    """Per-epoch method diagnostics (``diag_*``): term norms, bandwidth, kernel, disagreement."""
    epochs = [r["epoch"] for r in history]
    panels = [("Driving vs repulsive term (norm per member)",
               ("diag_driving_norm", "diag_repulsion_norm"), True),
              ("Kernel", ("diag_bandwidth", "diag_kernel_mean"), True),
              ("Member disagreement on the batch", ("diag_disagreement",), False)]
    panels = [p for p in panels if any(k in history[0] for k in p[1])]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys, log) in zip(axes[0], panels, strict=True):
        for key in keys:
            if key in history[0]:
                ax.plot(epochs, [max(r.get(key, float("nan")), 1e-30) for r in history],
                        label=key.removeprefix("diag_"))
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def plot_reliability(probs: np.ndarray, labels: np.ndarray, path: Path, bins: int = 15) -> None:
    conf, acc, count = (t.numpy() for t in metrics.reliability_diagram(
        torch.from_numpy(probs), torch.from_numpy(labels), bins=bins))
    edges = np.linspace(0, 1, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.8, 5.6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    filled = count > 0
    ax.bar(centers[filled], acc[filled], width=1 / bins, edgecolor="k", alpha=0.8,
           label="accuracy")
    ax.bar(centers[filled], conf[filled] - acc[filled], bottom=acc[filled], width=1 / bins,
           color="tab:red", alpha=0.35, edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ece = float(metrics.ece(torch.from_numpy(probs), torch.from_numpy(labels), bins=bins))
    ax.set_title(f"Reliability (ECE = {ece:.4f})")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    axc.bar(centers, count / count.sum(), width=1 / bins, edgecolor="k")
    axc.set_xlabel("confidence")
    axc.set_ylabel("fraction")
    _save(fig, path)


def plot_entropy_hist(probs: np.ndarray, ood: dict[str, np.ndarray], path: Path) -> None:
    ent_in = metrics.predictive_entropy(torch.from_numpy(probs)).numpy()
    top = np.log(probs.shape[-1])
    bins = np.linspace(0, top, 40)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.hist(ent_in, bins=bins, density=True, alpha=0.55, label="test (in-distribution)")
    for name, p in ood.items():
        ent = metrics.predictive_entropy(torch.from_numpy(p)).numpy()
        ax.hist(ent, bins=bins, density=True, histtype="step", lw=1.8, label=name)
    ax.set_xlabel("predictive entropy (nats)")
    ax.set_ylabel("density")
    ax.set_title("Predictive entropy: in- vs out-of-distribution")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_ensemble_size(curve: dict[str, list[float]], path: Path) -> None:
    """Metrics of the first k members against k."""
    k = curve["members"]
    keys = ["accuracy", "nll", "ece"] + [key for key in curve if key.startswith("auroc_")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        ax.plot(k, curve[key], "o-")
        ax.set_title(key.replace("auroc_", "OOD AUROC: "), fontsize=9)
        ax.set_xlabel("members k")
    fig.suptitle("Ensemble-size curve (first k members)", fontsize=10)
    _save(fig, path)


def plot_shift(figures: dict[str, Any], path: Path) -> None:
    """Corruption-severity curves (each type faint, mean bold) and rotation curves."""
    corr, rot = figures["corruptions"], figures["rotations"]
    severities = sorted(corr["mean"], key=int)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for ax, key in zip(axes[:2], ("accuracy", "ece"), strict=True):
        for name, table in corr.items():
            if name != "mean":
                ax.plot([int(s) for s in severities], [table[s][key] for s in severities],
                        color="gray", alpha=0.3, lw=0.8)
        ax.plot([int(s) for s in severities], [corr["mean"][s][key] for s in severities],
                "o-", color="k", lw=2, label="mean over types")
        ax.set_xlabel("corruption severity")
        ax.set_title(f"Corruptions: {key}", fontsize=9)
        ax.legend(fontsize=7)
    for ax, key in zip(axes[2:], ("accuracy", "ece"), strict=True):
        ax.plot(rot["angles"], rot[key], "o-")
        ax.set_xlabel("rotation (degrees)")
        ax.set_title(f"Rotations: {key}", fontsize=9)
    _save(fig, path)


def plot_shift_examples(examples: np.ndarray, names: np.ndarray, path: Path) -> None:
    """The first test image under every corruption type (rows) and severity (columns)."""
    rows, cols = examples.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.1))
    for i in range(rows):
        for j in range(cols):
            img = examples[i, j]
            ax = axes[i, j]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(np.transpose(img, (1, 2, 0)).clip(0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(str(names[i]), fontsize=6, rotation=0, ha="right", va="center")
            if i == 0:
                ax.set_title(f"severity {j + 1}", fontsize=7)
    _save(fig, path)


def plot_regression_1d(arrays: dict[str, np.ndarray], path: Path) -> None:
    x = arrays["inputs"][:, 0]
    means, stds = arrays["means"][..., 0], arrays["stds"][..., 0]
    order = np.argsort(x)
    mu = means.mean(0)
    epistemic = means.std(0)
    total = np.sqrt((stds**2).mean(0) + means.var(0))
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in range(means.shape[0]):
        ax.plot(x[order], means[m, order], color="tab:blue", alpha=0.25, lw=0.8)
    ax.fill_between(x[order], (mu - 2 * total)[order], (mu + 2 * total)[order],
                    color="tab:orange", alpha=0.2, label="±2 std (total)")
    ax.fill_between(x[order], (mu - 2 * epistemic)[order], (mu + 2 * epistemic)[order],
                    color="tab:blue", alpha=0.3, label="±2 std (members)")
    ax.plot(x[order], mu[order], color="k", lw=1.5, label="ensemble mean")
    if "train_inputs" in arrays:
        ax.scatter(arrays["train_inputs"][:, 0], arrays["train_targets"][:, 0], s=8,
                   color="tab:red", label="training data", zorder=3)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize=8)
    ax.set_title("Predictive mean ± std")
    _save(fig, path)


def plot_confidence_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path,
                           title: str = "Accuracy vs confidence threshold") -> None:
    """Selective prediction: accuracy of the examples with confidence ≥ τ, and their share.

    ``curves`` maps a label to ``(probs (M, N, C), labels (N,))``; one line per label
    (:func:`diverse.evaluation.evaluate.accuracy_vs_confidence` on a 0.01 grid of τ).
    """
    from diverse.evaluation.evaluate import accuracy_vs_confidence

    thresholds = [i / 100 for i in range(101)]
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for label, (probs, labels) in curves.items():
        c = accuracy_vs_confidence(torch.from_numpy(probs), torch.from_numpy(labels), thresholds)
        ax.plot(c["thresholds"], c["accuracy"], lw=1.6, label=label)
        axr.plot(c["thresholds"], c["retained"], lw=1.6, label=label)
    ax.set_xlabel("confidence threshold τ")
    ax.set_ylabel("accuracy on examples with max p ≥ τ")
    axr.set_xlabel("confidence threshold τ")
    axr.set_ylabel("fraction of examples retained")
    for a in (ax, axr):
        a.set_xlim(0, 1)
        a.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_reliability_overlay(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path,
                             bins: int = 15) -> None:
    """Reliability curves (accuracy against mean confidence per bin) of several models."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    for label, (probs, labels) in curves.items():
        p, y = torch.from_numpy(probs), torch.from_numpy(labels)
        conf, acc, count = (t.numpy() for t in metrics.reliability_diagram(p, y, bins=bins))
        filled = count > 0
        ece = float(metrics.ece(p, y, bins=bins))
        ax.plot(conf[filled], acc[filled], "o-", ms=3, label=f"{label} (ECE {ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)


def _entropy_panel(ax: plt.Axes, probs: np.ndarray, ood: dict[str, np.ndarray]) -> None:
    bins = np.linspace(0, np.log(probs.shape[-1]), 40)
    ent = metrics.predictive_entropy(torch.from_numpy(probs)).numpy()
    ax.hist(ent, bins=bins, density=True, alpha=0.55, label="test")
    for name, p in ood.items():
        ent = metrics.predictive_entropy(torch.from_numpy(p)).numpy()
        ax.hist(ent, bins=bins, density=True, histtype="step", lw=1.6, label=name)
    ax.set_xlabel("predictive entropy (nats)")


def ensemble_sizes(members: int) -> list[int]:
    """The ensemble sizes of the entropy small multiples: 1, the middle one and M."""
    return sorted({1, (members + 1) // 2, members})


def plot_entropy_by_size(probs: np.ndarray, ood: dict[str, np.ndarray], path: Path) -> None:
    """Entropy histograms, test vs OOD, of the first k members for k in 1, middle, M."""
    sizes = ensemble_sizes(probs.shape[0])
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.8 * len(sizes), 3.4), squeeze=False,
                             layout="constrained")
    for ax, k in zip(axes[0], sizes, strict=True):
        _entropy_panel(ax, probs[:k], {name: p[:k] for name, p in ood.items()})
        ax.set_title(f"first {k} member{'s' if k > 1 else ''}", fontsize=9)
    axes[0][0].set_ylabel("density")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Predictive entropy by ensemble size: test vs out-of-distribution", fontsize=10)
    _save(fig, path)


def plot_entropy_per_model(runs: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]],
                           path: Path) -> None:
    """One entropy histogram (test vs OOD) per model: ``runs[label] = (probs, ood)``."""
    fig, axes = plt.subplots(1, len(runs), figsize=(3.8 * len(runs), 3.4), squeeze=False,
                             layout="constrained")
    for ax, (label, (probs, ood)) in zip(axes[0], runs.items(), strict=True):
        _entropy_panel(ax, probs, ood)
        ax.set_title(label, fontsize=9)
    axes[0][0].set_ylabel("density")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Predictive entropy: test vs out-of-distribution", fontsize=10)
    _save(fig, path)


def _display(images: np.ndarray) -> np.ndarray:
    """Images ``(..., C, H, W)`` → ``(..., H, W)`` or ``(..., H, W, 3)`` in [0, 1]."""
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:  # not [0, 1] data (noise OOD, raw npz): stretch
        images = (images - lo) / max(hi - lo, 1e-12)
    images = images.clip(0, 1)
    if images.shape[-3] == 3:
        return np.moveaxis(images, -3, -1)
    return images[..., 0, :, :]


def plot_disagreement_examples(images: np.ndarray, value: np.ndarray, predicted: np.ndarray,
                               truth: np.ndarray | None, title: str, path: Path) -> None:
    """Two rows of images: the least (top) and most (bottom) disagreed-on examples.

    ``images`` ``(2, k, C, H, W)``; ``value`` (disagreement), ``predicted`` (ensemble
    class) and ``truth`` (label, or ``None`` for OOD sets) are ``(2, k)``. Drawn as one
    montage (one image, one axes: many small axes are slow to render).
    """
    shown = _display(images)
    k, h, w = images.shape[1], images.shape[-2], images.shape[-1]
    gap_x, gap_y = max(1, w // 6), max(2, h // 2)  # room between tiles and for captions
    canvas = np.ones((2 * (h + gap_y), k * (w + gap_x), *shown.shape[4:]))
    for row in range(2):
        for j in range(k):
            top, left = row * (h + gap_y) + gap_y, j * (w + gap_x)
            canvas[top:top + h, left:left + w] = shown[row, j]
    fig, ax = plt.subplots(figsize=(1.15 * k + 1.0, 3.6))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for row in range(2):
        for j in range(k):
            text = f"d={value[row, j]:.2f}\npred {predicted[row, j]}"
            if truth is not None:
                text += f" (true {truth[row, j]})"
            ax.text(j * (w + gap_x) + w / 2, row * (h + gap_y) + gap_y - 0.5, text,
                    ha="center", va="bottom", fontsize=6)
    ax.set_xticks([])
    ax.set_yticks([row * (h + gap_y) + gap_y + h / 2 for row in range(2)],
                  ["lowest\ndisagreement", "highest\ndisagreement"], fontsize=7)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=8)
    _save(fig, path)


def plot_decision_map(arrays: dict[str, np.ndarray], path: Path) -> None:
    """2D inputs: predicted class (shaded by confidence), predictive entropy and mutual
    information of the ensemble over the grid of :func:`diverse.evaluation.evaluate.decision_grid`,
    with the training points."""
    gx, gy, gp = arrays["grid_x"], arrays["grid_y"], arrays["grid_probs"]
    s, g, _, c = gp.shape
    flat = torch.from_numpy(gp.reshape(s, g * g, c))
    mean = flat.mean(0).numpy().reshape(g, g, c)
    colors = np.array(plt.get_cmap("tab10").colors)[np.arange(c) % 10]
    conf = mean.max(-1, keepdims=True)
    shade = (conf - 1 / c) / (1 - 1 / c)  # 0 at a uniform prediction, 1 at certainty
    rgb = colors[mean.argmax(-1)] * shade + (1 - shade)
    panels = [("Predicted class (shade: confidence)", rgb, None),
              ("Predictive entropy (nats)",
               metrics.predictive_entropy(flat).numpy().reshape(g, g), "viridis")]
    if s > 1:
        panels.append(("Mutual information (nats)",
                       metrics.mutual_information(flat).numpy().reshape(g, g), "magma"))
    extent = (float(gx[0]), float(gx[-1]), float(gy[0]), float(gy[-1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), squeeze=False,
                             layout="constrained")
    points, labels = arrays["train_inputs"], arrays["train_labels"]
    for ax, (title, image, cmap) in zip(axes[0], panels, strict=True):
        shown = ax.imshow(image, origin="lower", extent=extent, aspect="auto", cmap=cmap,
                          interpolation="nearest")
        if cmap is not None:
            fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.scatter(points[:, 0], points[:, 1], c=colors[labels], s=7, edgecolors="k",
                   linewidths=0.3)
        ax.set_title(title, fontsize=9)
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
    fig.suptitle("Decision and uncertainty map (training points overlaid)", fontsize=10)
    _save(fig, path)


def plot_similarity(matrices: dict[str, np.ndarray], path: Path) -> None:
    """Pairwise member-similarity heatmaps, one panel per ``(M, M)`` matrix (NaN blank)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.6 * len(matrices), 3.8), squeeze=False,
                             layout="constrained")
    for ax, (title, matrix) in zip(axes[0], matrices.items(), strict=True):
        m = matrix.shape[0]
        shown = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0,
                          vmax=max(float(np.nanmax(matrix)) if np.isfinite(matrix).any() else 1,
                                   1e-12))
        fig.colorbar(shown, ax=ax, fraction=0.046)
        if m <= 10:
            for i in range(m):
                for j in range(m):
                    if np.isfinite(matrix[i, j]):
                        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                                fontsize=7, color="w" if matrix[i, j] < 0.5 * np.nanmax(
                                    matrix) else "k")
        ticks = np.arange(m) if m <= 20 else np.arange(0, m, max(1, m // 10))
        ax.set_xticks(ticks, [str(t + 1) for t in ticks], fontsize=7)
        ax.set_yticks(ticks, [str(t + 1) for t in ticks], fontsize=7)
        ax.set_xlabel("member")
        ax.set_ylabel("member")
        ax.set_title(title, fontsize=9)
    _save(fig, path)


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


def plot_risk_coverage(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path,
                       title: str = "Risk–coverage") -> None:
    """Selective risk and generalized risk against coverage; ``curves[label] =
    (uncertainty (N,), errors (N,))``."""
    from diverse.math.selective import risk_coverage

    fig, (ax, axg) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for label, (u, e) in curves.items():
        c = risk_coverage(torch.from_numpy(np.asarray(u)), torch.from_numpy(np.asarray(e)))
        ax.plot(c["coverage"].numpy(), c["risk"].numpy(), lw=1.4, label=label)
        axg.plot(c["coverage"].numpy(), c["generalized_risk"].numpy(), lw=1.4, label=label)
    ax.set_ylabel("selective risk (error rate of the accepted)")
    axg.set_ylabel("generalized risk (accepted and wrong / N)")
    for a in (ax, axg):
        a.set_xlabel("coverage")
        a.set_xlim(0, 1)
        a.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_set_sizes(conformal: dict[str, Any], alpha: str, path: Path) -> None:
    """Histogram of conformal set sizes per score at level ``alpha``."""
    sets = conformal["sets"]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / max(len(sets), 1)
    for i, (score, table) in enumerate(sets.items()):
        counts = np.asarray(table[alpha]["size_counts"], dtype=float)
        sizes = np.arange(len(counts))
        ax.bar(sizes + (i - (len(sets) - 1) / 2) * width, counts / counts.sum(), width=width,
               label=f"{score.upper()} (mean {table[alpha]['mean_size']:.2f})")
    ax.set_xlabel("prediction set size")
    ax.set_ylabel("fraction of test examples")
    ax.set_title(f"Conformal set sizes at α = {alpha}", fontsize=10)
    ax.legend(fontsize=7)
    _save(fig, path)


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
