"""What is built on top of a trained model's predictions: OOD scores, selective
classification, temperature scaling and conformal prediction.

Functions of predictive samples (``probs``/``logits`` ``(S, N, C)``, or
regression ``means``/``stds`` ``(S, N, D)``) and labels; no model and no run.
Used by :mod:`diverse.evaluation.evaluate` (``metrics.json``), :mod:`diverse.evaluation.report`,
:mod:`diverse.app.compare` and :mod:`diverse.app.predictor` (``diverse.load``).

A :class:`Calibration` is what a validation split fits: the two temperatures
(:mod:`diverse.math.calibration`), the regression std scale, and the conformal
calibration scores of every nonconformity score (:mod:`diverse.metrics.conformal`), so
a prediction set can be formed at any α later. On disk it is
``RUN/calibration.json`` (scalars) and ``RUN/calibration.npz`` (scores), both
written atomically; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diverse import metrics, rundir
from diverse.checkpoint import atomic_save_npz, atomic_write_json
from diverse.math import calibration, confidence
from diverse.metrics import conformal, selective

CALIBRATION_JSON = rundir.CALIBRATION
CALIBRATION_NPZ = "calibration.npz"
FORMAT = "diverse-calibration"
#: Seed of the APS/RAPS draws on the calibration (validation) examples; test and
#: new inputs use :data:`diverse.metrics.conformal.RANDOM_SEED`, so the two are independent.
CALIBRATION_SEED = conformal.RANDOM_SEED + 1


# ------------------------------------------------------------------ OOD and selective


def ood_figures(probs: Tensor, logits: Tensor | None,
                ood: Mapping[str, tuple[Tensor, Tensor | None]]) -> dict[str, dict[str, Any]]:
    """Every uncertainty score's OOD detection figures on every OOD set.

    Each set is scored *mixed with the in-distribution test set* — the positives
    are the OOD examples, the negatives the test examples
    (:func:`diverse.metrics.ood_detection`) — never on the OOD set alone.
    ``ood`` maps a set name to its ``(probs, logits)``; a score needing logits is
    left out unless both sides have them. Returns ``{set: {score: {"auroc",
    "aupr_in", "aupr_out", "fpr95"}}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, (p_out, z_out) in ood.items():
        with_logits = logits is not None and z_out is not None
        s_in = confidence.uncertainty_scores(probs, logits if with_logits else None)
        s_out = confidence.uncertainty_scores(p_out, z_out if with_logits else None)
        out[name] = {score: metrics.ood_detection(s_in[score], s_out[score]) for score in s_in}
    return out


def errors_of(probs: Tensor, labels: Tensor) -> Tensor:
    """``(N,)`` float64: 1 where the ensemble's prediction ``argmax p̄`` is wrong."""
    return (metrics.mean_probs(probs).argmax(-1) != labels.to(probs.device)).to(torch.float64)


def selective_figures(probs: Tensor, logits: Tensor | None, labels: Tensor
                      ) -> dict[str, dict[str, float]]:
    """Selective classification with every score as the rejection order.

    The prediction is the ensemble's ``argmax p̄``; returns ``{score: {"aurc",
    "e_aurc", "augrc", "accuracy_at_50", ...}}``
    (:func:`diverse.metrics.selective.selective_metrics`).
    """
    errors = errors_of(probs, labels)
    return {name: selective.selective_metrics(score, errors)
            for name, score in confidence.uncertainty_scores(probs, logits).items()}


# ----------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """Post-hoc calibration fitted on a validation split.

    Attributes:
        task: ``"classification"`` or ``"regression"``.
        validation_examples: n, the size of the validation split.
        temperature: ``{"pooled": T, "members": T}`` (classification; ``members``
            only where logits exist).
        std_scale: the regression predictive-std scale ``s`` (1.0 for classification).
        scores: conformal calibration scores ``{name: (n,)}`` float64 — ``lac``,
            ``aps``, ``raps`` (classification) or ``regression`` (normalized residuals).
        raps_lambda, raps_k_reg: the RAPS penalty used for ``scores["raps"]``.
    """

    task: str
    validation_examples: int
    temperature: dict[str, float] = field(default_factory=dict)
    std_scale: float = 1.0
    scores: dict[str, Tensor] = field(default_factory=dict)
    raps_lambda: float = conformal.RAPS_LAMBDA
    raps_k_reg: int = conformal.RAPS_K_REG

    def threshold(self, alpha: float, score: str) -> float:
        """The split-conformal threshold q̂ of ``score`` at level α."""
        if score not in self.scores:
            raise ValueError(f"conformal score {score!r} not calibrated; allowed: "
                             f"{', '.join(self.scores)}")
        return conformal.conformal_quantile(self.scores[score], alpha)

    def class_scores(self, probs: Tensor, score: str, seed: int = conformal.RANDOM_SEED
                     ) -> Tensor:
        """Nonconformity ``(N, C)`` of the pooled predictive of samples ``probs (S, N, C)``."""
        pbar = metrics.mean_probs(probs)
        return conformal.class_scores(pbar, score, conformal.uniform_draws(len(pbar), seed),
                                      self.raps_lambda, self.raps_k_reg)


def fit_calibration(prediction: Mapping[str, Tensor], targets: Tensor,
                    raps_lambda: float = conformal.RAPS_LAMBDA,
                    raps_k_reg: int = conformal.RAPS_K_REG) -> Calibration:
    """Fit temperatures / std scale and the conformal scores on validation predictions.

    ``prediction`` is what :func:`diverse.app.train.predict` returns on the validation
    inputs: ``{"probs", "logits"}`` ``(S, n, C)`` or ``{"means", "stds"}``
    ``(S, n, D)``; ``targets`` the validation labels ``(n,)`` or targets ``(n, D)``.
    """
    if "probs" in prediction:
        probs, logits = prediction["probs"], prediction.get("logits")
        temperature = {"pooled": calibration.fit_temperature(targets, "pooled", probs=probs)}
        if logits is not None:
            temperature["members"] = calibration.fit_temperature(targets, "members",
                                                                 logits=logits)
        pbar = metrics.mean_probs(probs)
        u = conformal.uniform_draws(len(pbar), CALIBRATION_SEED)
        scores = {name: conformal.label_scores(
            conformal.class_scores(pbar, name, u, raps_lambda, raps_k_reg), targets)
            for name in conformal.CLASS_SCORES}
        return Calibration("classification", len(targets), temperature, 1.0, scores,
                           raps_lambda, raps_k_reg)
    means, stds = prediction["means"], prediction["stds"]
    scale = calibration.fit_std_scale(means, stds, targets)
    mean, std = regression_summary(means, stds)
    return Calibration("regression", len(targets), {}, scale,
                       {"regression": conformal.regression_scores(mean, std, targets)})


def regression_summary(means: Tensor, stds: Tensor) -> tuple[Tensor, Tensor]:
    """The mixture's mean and std ``(N, D)`` float64 from samples ``(S, N, D)``."""
    return means.to(torch.float64).mean(0), metrics.predictive_std(means, stds)


def calibration_figures(cal: Calibration, prediction: Mapping[str, Tensor], targets: Tensor,
                        alphas: Sequence[float] = conformal.ALPHAS) -> dict[str, Any]:
    """Test-set figures of a fitted calibration.

    Classification: ``temperature_scaling`` → ``{mode: {"temperature", "before",
    "after"}}`` (before/after: accuracy, NLL, ECE, ACE, Brier of the test
    predictions) and ``conformal`` → ``{"alphas", "validation_examples",
    "raps_lambda", "raps_k_reg", "sets": {score: {α: {"threshold", "coverage",
    "mean_size", "empty", "worst_class_coverage", "class_coverage",
    "size_counts"}}}}``. Regression: ``std_scaling`` (scale, NLL and calibration
    error before/after) and ``conformal`` → ``{"intervals": {α: {"threshold",
    "coverage", "mean_width"}}}``. α keys are strings (``"0.1"``).
    """
    out: dict[str, Any] = {}
    conf: dict[str, Any] = {"alphas": [float(a) for a in alphas],
                            "validation_examples": cal.validation_examples}
    if cal.task == "classification":
        probs, logits = prediction["probs"], prediction.get("logits")
        before = _classification_summary(probs, targets)
        scaling = {}
        for mode, temperature in cal.temperature.items():
            after = calibration.apply_temperature(temperature, mode, probs=probs, logits=logits)
            scaling[mode] = {"temperature": temperature, "before": before,
                             "after": _classification_summary(after, targets)}
        out["temperature_scaling"] = scaling
        conf.update(raps_lambda=cal.raps_lambda, raps_k_reg=cal.raps_k_reg, sets={})
        for score in cal.scores:
            test_scores = cal.class_scores(probs, score)
            conf["sets"][score] = {}
            for alpha in alphas:
                q = cal.threshold(alpha, score)
                figures = conformal.set_metrics(conformal.prediction_sets(test_scores, q),
                                                targets, probs.shape[-1])
                conf["sets"][score][_alpha_key(alpha)] = {"threshold": _finite(q), **figures}
    else:
        means, stds = prediction["means"], prediction["stds"]
        scaled = calibration.apply_std_scale(cal.std_scale, means.to(torch.float64),
                                             stds.to(torch.float64))
        out["std_scaling"] = {"scale": cal.std_scale,
                              "before": _regression_summary(means, stds, targets),
                              "after": _regression_summary(*scaled, targets)}
        mean, std = regression_summary(means, stds)
        conf["intervals"] = {}
        for alpha in alphas:
            q = cal.threshold(alpha, "regression")
            row = conformal.interval_metrics(mean, std, targets, q)
            conf["intervals"][_alpha_key(alpha)] = {
                "threshold": _finite(q), "coverage": row["coverage"],
                "mean_width": _finite(row["mean_width"])}  # None: too few examples for α
    out["conformal"] = conf
    return out


def _alpha_key(alpha: float) -> str:
    return f"{float(alpha):g}"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no inf


def _classification_summary(probs: Tensor, labels: Tensor) -> dict[str, float]:
    figures = metrics.classification_metrics(probs, labels)
    return {k: figures[k] for k in ("accuracy", "nll", "ece", "ace", "brier")}


def _regression_summary(means: Tensor, stds: Tensor, targets: Tensor) -> dict[str, float]:
    figures = metrics.regression_metrics(means, stds, targets)
    return {k: figures[k] for k in ("nll", "calibration_error", "mean_std")}


# ------------------------------------------------------------------------------ disk


def save_calibration(run_dir: Path, cal: Calibration) -> None:
    """``RUN/calibration.npz`` (scores) then ``RUN/calibration.json`` (scalars), atomically."""
    atomic_save_npz(Path(run_dir) / CALIBRATION_NPZ,
                    {f"scores_{k}": v.cpu().numpy() for k, v in cal.scores.items()})
    atomic_write_json(Path(run_dir) / CALIBRATION_JSON, {
        "format": FORMAT, "task": cal.task, "validation_examples": cal.validation_examples,
        "temperature": cal.temperature, "std_scale": cal.std_scale,
        "raps_lambda": cal.raps_lambda, "raps_k_reg": cal.raps_k_reg,
        "conformal_scores": sorted(cal.scores)})


def load_calibration(run_dir: Path) -> Calibration | None:
    """The run's saved :class:`Calibration`, or ``None`` when it has none."""
    path = Path(run_dir) / CALIBRATION_JSON
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    with np.load(Path(run_dir) / CALIBRATION_NPZ, allow_pickle=False) as npz:
        scores = {name: torch.from_numpy(npz[f"scores_{name}"]).to(torch.float64)
                  for name in meta["conformal_scores"]}
    return Calibration(meta["task"], int(meta["validation_examples"]),
                       {k: float(v) for k, v in meta["temperature"].items()},
                       float(meta["std_scale"]), scores, float(meta["raps_lambda"]),
                       int(meta["raps_k_reg"]))


def remove_calibration(run_dir: Path) -> None:
    """Delete a stale calibration (e.g. before the run is evaluated again)."""
    for name in (CALIBRATION_JSON, CALIBRATION_NPZ):
        (Path(run_dir) / name).unlink(missing_ok=True)
