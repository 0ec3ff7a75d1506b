"""The run report: ``report.md`` with ``plots/*.png`` and an offline
``report.html`` (images embedded), rebuilt from run files.

Reads only what a run directory holds (``config.toml``, ``metrics.json``,
``predictions.npz``, the checkpoint manifest's history), so ``diverse report``
works on any finished run without the model. Plots: training curves,
reliability diagram, predictive entropy in- vs out-of-distribution, and for a
1D regression the predictive mean ± 2 std with the training points.
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

from diverse import metrics  # noqa: E402
from diverse.checkpoint import atomic_write_text, publish  # noqa: E402
from diverse.errors import UserError  # noqa: E402
from diverse.html import markdown_to_html  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    publish(tmp, path)


def plot_training_curves(history: list[dict[str, Any]], path: Path) -> None:
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(epochs, [r["train_loss"] for r in history], "o-", label="train objective")
    test = [(r["epoch"], r["test_nll"]) for r in history if "test_nll" in r]
    if test:
        axes[0].plot(*zip(*test, strict=True), "s-", label="test NLL (ensemble)")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    key, test_key, label = (("train_accuracy", "test_accuracy", "accuracy")
                            if "train_accuracy" in history[0]
                            else ("train_neg_mse", "test_rmse", "−MSE / RMSE"))
    axes[1].plot(epochs, [r[key] for r in history], "o-", label=f"train ({key})")
    test = [(r["epoch"], r[test_key]) for r in history if test_key in r]
    if test:
        axes[1].plot(*zip(*test, strict=True), "s-", label=f"test ({test_key})")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel(label)
    axes[1].legend()
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
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise UserError(f"{str(metrics_path)!r} does not exist: run `diverse evaluate {run_dir}` "
                        "first")
    figures = json.loads(metrics_path.read_text())
    with np.load(run_dir / "predictions.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    history = _history(run_dir)
    lines = [f"# Run report: `{run_dir.name}`", "",
             f"Method **{figures['method']}**, M = {figures['members']} members, "
             f"data **{figures['dataset']}** ({figures['n_test']} test examples).", ""]
    images: list[tuple[str, str]] = []
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
            lines += ["## Out-of-distribution detection", "",
                      "| OOD set | score | AUROC | AUPR-in | AUPR-out | FPR95 |",
                      "|---|---|---|---|---|---|"]
            for key, score in (("ood", "entropy"), ("ood_mutual_information", "mutual info")):
                for name, row in figures.get(key, {}).items():
                    lines.append(f"| {name} | {score} | {row['auroc']:.4f} | {row['aupr_in']:.4f}"
                                 f" | {row['aupr_out']:.4f} | {row['fpr95']:.4f} |")
            lines.append("")
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
    inputs = arrays.get("inputs")
    if "probs" not in arrays and inputs is not None and inputs.shape[1:] == (1,):
        plot_regression_1d(arrays, plots / "regression.png")
        images.append(("Predictive mean ± std", "plots/regression.png"))
    for title, rel in images:
        lines += [f"## {title}", "", f"![{title}]({rel})", ""]
    if history:
        lines += ["## History", "", "| epoch | seconds | train loss | test |", "|---|---|---|---|"]
        for r in history:
            test = ", ".join(f"{k}={v:.4f}" for k, v in r.items() if k.startswith("test_"))
            lines.append(f"| {r['epoch']} | {r['seconds']:.1f} | {r['train_loss']:.4f} | {test} |")
        lines.append("")
    config = run_dir / "config.toml"
    if config.is_file():
        lines += ["## Configuration", "", "```toml", config.read_text().rstrip(), "```", ""]
    path = run_dir / "report.md"
    markdown = "\n".join(lines)
    atomic_write_text(path, markdown)
    atomic_write_text(run_dir / "report.html",
                      markdown_to_html(markdown, run_dir, f"diverse run {run_dir.name}"))
    return path
