"""The plots of run and comparison reports: pure functions of arrays and figures that
write one PNG each (matplotlib, Agg backend).

Training curves and method diagnostics, reliability diagrams and their overlays,
accuracy and risk against confidence and coverage, predictive entropy in and out of
distribution (by ensemble size and per model), the ensemble-size curve, corruption and
rotation curves with example images, member-similarity heatmaps, the images with the
lowest and highest member disagreement, 2D decision/uncertainty maps, a 1D regression's
predictive band, and conformal set sizes. :mod:`diverse.evaluation.report` composes them.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from diverse import metrics  # noqa: E402
from diverse.checkpoint import publish  # noqa: E402


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




def plot_risk_coverage(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path,
                       title: str = "Risk–coverage") -> None:
    """Selective risk and generalized risk against coverage; ``curves[label] =
    (uncertainty (N,), errors (N,))``."""
    from diverse.metrics.selective import risk_coverage

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




#: the posterior study's modes (single- and multi-mode posteriors) and their colours
MODE_COLORS = {"single": "tab:orange", "multi": "tab:blue"}


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
            for mode in MODE_COLORS:
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
        for k, mode in enumerate(MODE_COLORS):
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


