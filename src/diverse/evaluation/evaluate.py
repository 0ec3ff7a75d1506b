"""Evaluation of a trained ensemble: ``metrics.json`` and ``predictions.npz``.

Classification: accuracy, NLL of the ensemble mean, ECE (15 bins), adaptive
ECE, Brier, entropies, mutual information, disagreement, per-member accuracy
and NLL, the ensemble-size curve (``ensemble_size``: the metrics of the first
k members, k = 1..M), for each OOD set the detection figures of every
uncertainty score (``ood_scores``; :mod:`diverse.math.confidence`), their near/far
group (``ood_groups``) and the predictive-entropy row as the headline
(``ood``), and selective classification with every score (``selective``:
AURC, E-AURC, AUGRC, accuracy at 50/80/90/95% coverage). Regression: RMSE, the
mixture's Gaussian NLL, calibration error and mean predictive std. With a
validation split, post-hoc calibration fitted on it (temperature scaling or std
scaling, conformal sets or intervals: :mod:`diverse.evaluation.posthoc`).

``predictions.npz`` holds ``probs`` and ``logits (S, N, C)`` and ``labels (N,)`` (and
``ood_probs_<set>``, ``ood_logits_<set> (S, K, C)``), or for regression ``means``/``stds``
``(S, N, D)``, ``targets`` and ``inputs``.

For the report's plots, classification runs also get what only the model can
give, so ``diverse report`` rebuilds every figure from the run directory:
``confidence_curve`` (accuracy vs confidence threshold), ``function_distance``
(``M × M`` mean total variation between member predictives) and ``cka``
(linear CKA of the members' last ``feature_layers`` output on ≤ 500 test
inputs) in ``metrics.json``; for images ``disagree_<set>_{index,images,value,
entropy}`` (the 8 least / most disagreed-on test and ``ood_<name>`` examples,
images in data units); for 2-feature inputs ``grid_x``, ``grid_y``,
``grid_probs (M, G, G, C)``, ``train_inputs`` and ``train_labels``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from diverse import metrics, rundir
from diverse.data.datasets import Dataset, denormalize, normalize
from diverse.data.ood import ood_group
from diverse.evaluation.posthoc import (
    Calibration,
    calibration_figures,
    fit_calibration,
    ood_figures,
    remove_calibration,
    save_calibration,
    selective_figures,
)
from diverse.evaluation.prediction import predict_run
from diverse.math.mcmc import effective_sample_size, split_rhat
from diverse.methods.base import TrainingData
from diverse.methods.catalog import predict_samples
from diverse.metrics import conformal
from diverse.nets.ensemble import evaluating

if TYPE_CHECKING:  # the application layer's run; evaluation only reads it
    from diverse.app.train import Run


def member_figures(probs: Tensor, labels: Tensor) -> dict[str, list[float]]:
    return {
        "member_accuracy": [float(metrics.accuracy(p[None], labels)) for p in probs],
        "member_nll": [float(metrics.nll(p[None], labels)) for p in probs],
    }


def ensemble_size_curve(probs: Tensor, labels: Tensor,
                        ood: dict[str, Tensor] | None = None) -> dict[str, list[float]]:
    """Metrics of the first k members, k = 1..M (D'Angelo & Fortuin 2021: no gain beyond
    ~5 members).

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
    """1D inputs: mean member spread (population std of member means) far from / near the data.

    A test input is "far" when its nearest training input (in the data's own
    units) is more than ``far`` away — e.g. the gap of the ``regression-1d``
    toy. ``means`` is ``(M, N)``.
    """
    x_test = _raw_inputs(data.x_test, data)[:, 0]
    x_train = _raw_inputs(data.x_train, data)[:, 0]
    distance = (x_test[:, None] - x_train[None, :]).abs().min(1).values
    # population std (no Bessel correction), the convention of metrics.predictive_std
    spread = means.std(0, correction=0)
    mask = distance > far
    return {"member_std_far_from_data": float(spread[mask].mean()) if mask.any() else 0.0,
            "member_std_near_data": float(spread[~mask].mean()) if (~mask).any() else 0.0}


#: Confidence thresholds τ of :func:`accuracy_vs_confidence` in ``metrics.json``.
CONFIDENCE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))


def accuracy_vs_confidence(probs: Tensor, labels: Tensor,
                           thresholds: Sequence[float] = CONFIDENCE_THRESHOLDS
                           ) -> dict[str, list[float]]:
    """Selective prediction: accuracy of the examples the ensemble is confident about.

    With ``conf_n = max_c p̄_nc`` (``p̄`` the mean over the sample axis) and
    ``ŷ_n = argmax_c p̄_nc``, for every threshold τ::

        retained(τ) = (1/N) Σ_n 1[conf_n ≥ τ]
        accuracy(τ) = Σ_n 1[conf_n ≥ τ] 1[ŷ_n = y_n] / Σ_n 1[conf_n ≥ τ]   (NaN if none kept)

    (Lakshminarayanan et al. 2017, Fig. 3: accuracy vs confidence threshold.)

    Args:
        probs: ``(M, N, C)``. labels: ``(N,)``. thresholds: τ values.

    Returns:
        ``{"thresholds": [T], "accuracy": [T], "retained": [T]}``.
    """
    p = metrics.mean_probs(probs)
    conf, pred = p.max(-1)
    correct = (pred == labels.to(pred.device)).to(torch.float64)
    tau = torch.tensor(list(thresholds), dtype=torch.float64)
    keep = (conf.to(torch.float64)[None, :] >= tau[:, None]).to(torch.float64)  # (T, N)
    kept = keep.sum(1)
    accuracy = torch.where(kept > 0, (keep * correct).sum(1) / kept.clamp_min(1), torch.nan)
    return {"thresholds": tau.tolist(), "accuracy": accuracy.tolist(),
            "retained": (kept / len(correct)).tolist()}


def member_probs(probs: Tensor, draws: int = 1) -> Tensor:
    """Per-member predictive distributions from ``(S, N, C)`` predictive samples.

    With ``draws > 1`` the samples are stacked draw-major (``S = draws × M``,
    :func:`diverse.app.train.member_outputs`), and member m's predictive is the mean
    of its draws; otherwise the samples are the members. Returns ``(M, N, C)``.
    """
    if draws > 1 and probs.shape[0] % draws == 0:
        return probs.reshape(draws, probs.shape[0] // draws, *probs.shape[1:]).mean(0)
    return probs


def function_distance(probs: Tensor) -> Tensor:
    """Mean total-variation distance between member predictive distributions.

    ``D_mk = (1/N) Σ_n ½ Σ_c |p_mnc − p_knc|`` ∈ [0, 1]: 0 for members that
    predict alike, 1 for disjoint predictions. ``probs`` ``(M, N, C)`` →
    ``(M, M)`` float64, symmetric with a zero diagonal.
    """
    p = probs.to(torch.float64)
    return torch.stack([(p[m][None] - p).abs().sum(-1).mean(-1) / 2 for m in range(len(p))])


def disagreement_extremes(probs: Tensor, k: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` examples with the lowest and the highest member disagreement.

    Disagreement is :func:`diverse.metrics.disagreement_with_mean` (the fraction
    of members whose argmax differs from the ensemble's); ties are broken by the
    predictive entropy (lowest first for the low row, highest first for the
    high row). ``probs`` ``(M, N, C)``. Returns ``index (2, k)`` int64 (row 0
    lowest, row 1 highest), and the disagreement and entropy ``(2, k)`` there.
    """
    d = metrics.disagreement_with_mean(probs).cpu().numpy()
    h = metrics.predictive_entropy(probs).cpu().numpy()
    order = np.lexsort((h, d))  # by disagreement, then entropy, ascending
    k = min(k, len(order))
    index = torch.from_numpy(np.stack([order[:k], order[::-1][:k]]).astype(np.int64))
    return index, torch.from_numpy(d)[index], torch.from_numpy(h)[index]


def disagreement_examples(probs: Tensor, images: Tensor, prefix: str,
                          k: int = 8) -> dict[str, np.ndarray]:
    """Arrays of the ``k`` least / most disagreed-on images for the report.

    ``images`` ``(N, C, H, W)`` in the data's own units. Keys
    ``<prefix>_index``, ``<prefix>_images (2, k, C, H, W)``, ``<prefix>_value``
    (disagreement) and ``<prefix>_entropy``, each with leading ``(2, k)``.
    """
    index, value, entropy = disagreement_extremes(probs, k)
    return {f"{prefix}_index": index.numpy(), f"{prefix}_images": images[index].float().numpy(),
            f"{prefix}_value": value.numpy(), f"{prefix}_entropy": entropy.numpy()}


def decision_grid(run: Run, size: int = 80, margin: float = 0.25) -> dict[str, np.ndarray]:
    """Predictive samples on a ``size × size`` grid over 2-feature inputs.

    The grid spans the training and test inputs (data units) widened by
    ``margin`` of their range on each side, so the map shows how uncertainty
    grows away from the data. Returns ``grid_x (G,)``, ``grid_y (G,)``,
    ``grid_probs (S, G, G, C)`` (``[s, i, j]`` at ``(grid_x[j], grid_y[i])``),
    ``train_inputs (N, 2)`` and ``train_labels (N,)``.
    """
    data = run.dataset
    train_raw = _raw_inputs(data.x_train, data)
    points = torch.cat([train_raw, _raw_inputs(data.x_test, data)])
    lo, hi = points.min(0).values, points.max(0).values
    pad = margin * (hi - lo).clamp_min(1e-6)
    gx = torch.linspace(float(lo[0] - pad[0]), float(hi[0] + pad[0]), size)
    gy = torch.linspace(float(lo[1] - pad[1]), float(hi[1] + pad[1]), size)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    grid = normalize(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1), data.mean, data.std)
    probs = predict_run(run, grid)["probs"]
    return {"grid_x": gx.numpy(), "grid_y": gy.numpy(),
            "grid_probs": probs.reshape(probs.shape[0], size, size, -1).float().numpy(),
            "train_inputs": train_raw.numpy(), "train_labels": data.y_train.numpy()}


@torch.no_grad()
def member_cka(run: Run, n: int = 500) -> dict[str, Any] | None:
    """Linear CKA between the members' features at every feature layer, on ``n`` test inputs.

    The layers are the model's ``feature_layers`` (for a hypernetwork: its
    target's, on the ``predict_members`` generated networks); features
    ``(M, B, ...)`` are flattened to ``(M, B, P)`` and passed to
    :func:`diverse.math.cka.cka_matrix` (Kornblith et al. 2019). Returns
    ``{"layer", "examples", "matrix"}`` for the last (penultimate) layer plus
    ``"layers": {layer: {"matrix", "mean"}}`` (``mean`` = mean off-diagonal
    CKA), or ``None`` when there is one member or no feature layer.
    """
    from diverse.math.cka import cka_matrix

    module = run.ensemble.module
    generator = run.ensemble.generates_members
    owner = module.target if generator else module
    named = dict(owner.named_modules())
    layers = [name for name in getattr(owner, "feature_layers", ()) if name in named]
    x = run.dataset.x_test[:n].to(run.ensemble.device)
    with evaluating(run.ensemble), torch.no_grad():
        if generator:
            from diverse.nets.hypernet import generate_with

            own = {k: v[0] for k, v in run.ensemble.params.items()}
            params = generate_with(module, own, module.predict_codes)
            _out, feats = module.apply_features(params, x, layers)
        else:
            _out, feats = run.ensemble.features(x, layers)
    members = next(iter(feats.values())).shape[0] if feats else 0
    if not layers or members < 2:
        return None
    per_layer: dict[str, Any] = {}
    for layer in layers:
        f = feats[layer].reshape(members, len(x), -1).to("cpu", torch.float64)
        matrix = cka_matrix(f, kernel="linear")
        off = matrix[~torch.eye(members, dtype=torch.bool)]
        per_layer[layer] = {"matrix": _json_matrix(matrix), "mean": float(off.nanmean())}
    return {"layer": layers[-1], "examples": len(x), "matrix": per_layer[layers[-1]]["matrix"],
            "layers": per_layer}


def _json_matrix(matrix: Tensor) -> list[list[float | None]]:
    """A matrix as nested lists, NaN as ``None`` (JSON has no NaN)."""
    return [[None if math.isnan(v) else v for v in row] for row in matrix.tolist()]


def similarity_and_examples(run: Run, probs: Tensor,
                            ood: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Figures and arrays of the report's member-similarity, selective-prediction,
    disagreement-example and 2D-map plots (classification runs).

    ``probs`` ``(S, N, C)`` on the test set, ``ood`` set name → ``(S, K, C)``.
    """
    data = run.dataset
    curve = accuracy_vs_confidence(probs, data.y_test)
    curve["accuracy"] = [None if math.isnan(a) else a for a in curve["accuracy"]]
    members = member_probs(probs, predict_samples(run.cfg.method))
    out: dict[str, Any] = {"confidence_curve": curve,
                           "function_distance": _json_matrix(function_distance(members))}
    cka = member_cka(run)
    if cka is not None:
        out["cka"] = cka
    arrays: dict[str, np.ndarray] = {}
    if data.x_test.dim() == 4:  # images: the least / most disagreed-on examples
        arrays.update(disagreement_examples(probs, _raw_inputs(data.x_test, data),
                                            "disagree_test"))
        for name, p_out in ood.items():
            arrays.update(disagreement_examples(p_out, _raw_inputs(data.ood[name], data),
                                                f"disagree_ood_{name}"))
    if data.input_shape == (2,):
        arrays.update(decision_grid(run))
    if getattr(run.cfg.method, "outliers", 0) > 0:
        arrays["training_outliers"] = training_outlier_examples(run)
    return out, arrays


def training_outlier_examples(run: Run, count: int = 32) -> np.ndarray:
    """``count`` synthetic outliers as the method draws them in training, raw ``[0, 1]``.

    Same generator and settings as the training steps (:class:`diverse.
    feature_repulsion.OutlierSource`), seeded by the run seed, for the report's grid.
    """
    from diverse.methods.feature_repulsion import OutlierSource

    source = OutlierSource(replace(run.cfg.method, outliers=count), TrainingData.of(run.dataset))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.cfg.train.seed)
        x = source(torch.device("cpu"))
    return _raw_inputs(x, run.dataset).clamp(0, 1).numpy()


def chain_figures(values: Tensor, members: int, draws: int) -> dict[str, float]:
    """Split-R̂ and ESS of predictive samples read as ``members`` chains of ``draws`` draws.

    ``values`` ``(S, N, ...)`` draw-major (``S = draws × members``, sample ``d·M + m`` is
    draw d of chain m, :mod:`diverse.nets.samples`): probabilities or regression means at
    the test inputs, each (example, output) one quantity — functions are identified
    where weights are not. Quantities constant in every chain are left out.
    """
    x = values.reshape(draws, members, -1).transpose(0, 1).to(torch.float64)  # (M, K, Q)
    moving = x.var(1).min(0).values > 0
    x = x[..., moving]
    if x.shape[-1] == 0:
        return {}
    rhat, ess = split_rhat(x), effective_sample_size(x)
    return {"chains": members, "draws": draws, "quantities": int(x.shape[-1]),
            "rhat_max": float(rhat.max()), "rhat_median": float(rhat.median()),
            "rhat_above_1.01": float((rhat > 1.01).double().mean()),
            "ess_min": float(ess.min()), "ess_median": float(ess.median())}


def mcmc_figures(run: Run, pred: dict[str, Tensor]) -> dict[str, float]:
    """Chain diagnostics of a run with weight samples of ≥ 2 members × ≥ 4 draws (HMC,
    SGHMC, ...), plus an HMC run's acceptance, divergences and step size; ``{}`` otherwise."""
    if run.samples is None or run.samples.members < 2 or run.samples.draws < 4:
        return {}
    values = pred["probs"] if "probs" in pred else pred["means"]
    out = chain_figures(values, run.samples.members, run.samples.draws)
    if "hmc_accept" in run.state:
        from diverse.methods.hmc import chain_summary

        out.update(chain_summary(run.state))
    return out


def fit_run_calibration(run: Run, raps_lambda: float = conformal.RAPS_LAMBDA,
                        raps_k_reg: int = conformal.RAPS_K_REG) -> Calibration | None:
    """Temperatures / std scale and conformal scores fitted on the run's validation
    split (:func:`diverse.evaluation.posthoc.fit_calibration`); ``None`` without one."""
    data = run.dataset
    if not data.has_validation:
        return None
    return fit_calibration(predict_run(run, data.x_val), data.y_val, raps_lambda, raps_k_reg)


def evaluate(run: Run, ood_names: list[str] | None = None,
             calibration: Calibration | None = None,
             alphas: Sequence[float] = conformal.ALPHAS
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics and prediction arrays of the run's ensemble on the test (and OOD) sets.

    ``ood_names`` restricts the OOD sets to those named (default: all loaded).
    With a ``calibration`` (:func:`fit_run_calibration`), the figures gain
    ``temperature_scaling`` / ``std_scaling`` and ``conformal`` at the levels
    ``alphas`` (:func:`diverse.evaluation.posthoc.calibration_figures`).
    """
    data = run.dataset
    pred = predict_run(run, data.x_test)
    samples = next(iter(pred.values())).shape[0]
    out: dict[str, Any] = {"method": run.cfg.method.name, "members": run.cfg.ensemble.members,
                           "predictive_samples": samples,
                           "dataset": data.name, "n_test": len(data.x_test),
                           "n_validation": len(data.x_val) if data.has_validation else 0}
    arrays: dict[str, np.ndarray] = {}
    mcmc = mcmc_figures(run, pred)
    if mcmc:
        out["mcmc"] = mcmc
    if data.task == "classification":
        probs, logits, labels = pred["probs"], pred.get("logits"), data.y_test
        out.update(metrics.classification_metrics(probs, labels))
        out.update(member_figures(probs, labels))
        arrays["probs"] = probs.float().numpy()
        arrays["labels"] = labels.numpy()
        if logits is not None:
            arrays["logits"] = logits.float().numpy()
        # an npz file's own x_ood set is part of the data: kept when --ood names others
        names = list(data.ood) if ood_names is None else [
            *ood_names, *(n for n in data.ood if n == "npz" and n not in ood_names)]
        ood: dict[str, tuple[Tensor, Tensor | None]] = {}
        for name in names:
            pred_out = predict_run(run, data.ood[name])
            ood[name] = (pred_out["probs"], pred_out.get("logits"))
            arrays[f"ood_probs_{name}"] = pred_out["probs"].float().numpy()
            if "logits" in pred_out:
                arrays[f"ood_logits_{name}"] = pred_out["logits"].float().numpy()
        by_score = ood_figures(probs, logits, ood)
        out["ood"] = {name: by_score[name]["entropy"] for name in names}  # the headline score
        out["ood_scores"] = by_score
        out["ood_groups"] = {name: ood_group(name, data.name, run.cfg.data.near_ood)
                             for name in names}
        out["selective"] = selective_figures(probs, logits, labels)
        out["ensemble_size"] = ensemble_size_curve(probs, labels,
                                                   {k: v[0] for k, v in ood.items()})
        report_figures, report_arrays = similarity_and_examples(
            run, probs, {k: v[0] for k, v in ood.items()})
        out.update(report_figures)
        arrays.update(report_arrays)
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
    if calibration is not None:
        out.update(calibration_figures(calibration, pred, data.y_test, alphas))
    return out, arrays


def write_evaluation(run_dir: Path, figures: dict[str, Any], arrays: dict[str, np.ndarray],
                     calibration: Calibration | None = None) -> None:
    """``predictions.npz``, the calibration files (or their removal) and, last,
    ``metrics.json`` (whose presence marks a finished evaluation)."""
    run_dir = Path(run_dir)
    rundir.remove(run_dir, rundir.METRICS)
    rundir.write_arrays(run_dir, rundir.PREDICTIONS, arrays)
    if calibration is None:
        remove_calibration(run_dir)
    else:
        save_calibration(run_dir, calibration)
    rundir.write_json(run_dir, rundir.METRICS, figures)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return rundir.read_json(run_dir, rundir.METRICS)
