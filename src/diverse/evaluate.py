"""Evaluation of a trained ensemble: ``metrics.json`` and ``predictions.npz``.

Classification: accuracy, NLL of the ensemble mean, ECE (15 bins), adaptive
ECE, Brier, entropies, mutual information, disagreement, per-member accuracy
and NLL, the ensemble-size curve (``ensemble_size``: the metrics of the first
k members, k = 1..M), and for each OOD set the detection figures with the predictive
entropy as score (``ood``) and with the mutual information
(``ood_mutual_information``). Regression: RMSE, the mixture's Gaussian NLL,
calibration error and mean predictive std.

``predictions.npz`` holds ``probs (M, N, C)`` and ``labels (N,)`` (and
``ood_probs_<set> (M, K, C)``), or for regression ``means``/``stds``
``(M, N, D)``, ``targets`` and ``inputs``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diverse import metrics
from diverse.checkpoint import atomic_save_npz, atomic_write_json
from diverse.data import Dataset, denormalize
from diverse.train import Run, predict_run


def member_figures(probs: Tensor, labels: Tensor) -> dict[str, list[float]]:
    return {
        "member_accuracy": [float(metrics.accuracy(p[None], labels)) for p in probs],
        "member_nll": [float(metrics.nll(p[None], labels)) for p in probs],
    }


def ensemble_size_curve(probs: Tensor, labels: Tensor,
                        ood: dict[str, Tensor] | None = None) -> dict[str, list[float]]:
    """Metrics of the first k members, k = 1..M (seed 003: no gain beyond ~5 members).

    ``probs`` ``(M, N, C)``; ``ood`` maps set names to ``(M, K, C)``. Returns
    ``{"members": [1..M], "accuracy": [...], "nll": [...], "ece": [...],
    "brier": [...], "auroc_<set>": [...]}`` (AUROC with the predictive entropy).
    """
    curve: dict[str, list[float]] = {"members": [], "accuracy": [], "nll": [], "ece": [],
                                     "brier": []}
    for k in range(1, probs.shape[0] + 1):
        sub = probs[:k]
        curve["members"].append(k)
        curve["accuracy"].append(float(metrics.accuracy(sub, labels)))
        curve["nll"].append(float(metrics.nll(sub, labels)))
        curve["ece"].append(float(metrics.ece(sub, labels)))
        curve["brier"].append(float(metrics.brier(sub, labels)))
        for name, p_out in (ood or {}).items():
            auroc = metrics.ood_metrics(sub, p_out[:k], score="entropy")["auroc"]
            curve.setdefault(f"auroc_{name}", []).append(auroc)
    return curve


def _raw_inputs(x: Tensor, data: Dataset) -> Tensor:
    """The inputs in the data's own units (for plots and distances)."""
    return denormalize(x, data.mean, data.std)


def data_gap_spread(data: Dataset, means: Tensor, far: float = 0.5) -> dict[str, float]:
    """1D inputs: mean member spread (std of member means) far from / near the data.

    A test input is "far" when its nearest training input (in the data's own
    units) is more than ``far`` away — e.g. the gap of the ``regression-1d``
    toy. ``means`` is ``(M, N)``.
    """
    x_test = _raw_inputs(data.x_test, data)[:, 0]
    x_train = _raw_inputs(data.x_train, data)[:, 0]
    distance = (x_test[:, None] - x_train[None, :]).abs().min(1).values
    spread = means.std(0) if means.shape[0] > 1 else torch.zeros(means.shape[1])
    mask = distance > far
    return {"member_std_far_from_data": float(spread[mask].mean()) if mask.any() else 0.0,
            "member_std_near_data": float(spread[~mask].mean()) if (~mask).any() else 0.0}


def evaluate(run: Run, ood_names: list[str] | None = None) -> tuple[dict[str, Any],
                                                                    dict[str, np.ndarray]]:
    """Metrics and prediction arrays of the run's ensemble on the test (and OOD) sets.

    ``ood_names`` restricts the OOD sets to those named (default: all loaded).
    """
    data = run.dataset
    pred = predict_run(run, data.x_test)
    samples = next(iter(pred.values())).shape[0]
    out: dict[str, Any] = {"method": run.cfg.method.name, "members": run.cfg.ensemble.members,
                           "predictive_samples": samples,
                           "dataset": data.name, "n_test": len(data.x_test)}
    arrays: dict[str, np.ndarray] = {}
    if data.task == "classification":
        probs, labels = pred["probs"], data.y_test
        out.update(metrics.classification_metrics(probs, labels))
        out.update(member_figures(probs, labels))
        arrays["probs"] = probs.float().numpy()
        arrays["labels"] = labels.numpy()
        out["ood"], out["ood_mutual_information"] = {}, {}
        names = list(data.ood) if ood_names is None else ood_names
        for name in names:
            probs_out = predict_run(run, data.ood[name])["probs"]
            out["ood"][name] = metrics.ood_metrics(probs, probs_out, score="entropy")
            out["ood_mutual_information"][name] = metrics.ood_metrics(
                probs, probs_out, score="mutual_information")
            arrays[f"ood_probs_{name}"] = probs_out.float().numpy()
        out["ensemble_size"] = ensemble_size_curve(
            probs, labels, {k[len("ood_probs_"):]: torch.from_numpy(v)
                            for k, v in arrays.items() if k.startswith("ood_probs_")})
    else:
        means, stds, y = pred["means"], pred["stds"], data.y_test
        out.update(metrics.regression_metrics(means[..., 0], stds[..., 0], y[:, 0]))
        if data.x_train.shape[1:] == (1,):
            out.update(data_gap_spread(data, means[..., 0]))
        arrays.update(means=means.numpy(), stds=stds.numpy(), targets=y.numpy(),
                      inputs=_raw_inputs(data.x_test, data).numpy())
        if data.x_train.shape[1:] == (1,):
            arrays["train_inputs"] = _raw_inputs(data.x_train, data).numpy()
            arrays["train_targets"] = data.y_train.numpy()
    return out, arrays


def write_evaluation(run_dir: Path, figures: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    atomic_save_npz(Path(run_dir) / "predictions.npz", arrays)
    atomic_write_json(Path(run_dir) / "metrics.json", figures)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())
