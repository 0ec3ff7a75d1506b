"""Evaluation figures behind the report plots, and the run / comparison reports."""

import base64
import json
import math
import re

import numpy as np
import pytest
import torch

from diverse import metrics
from diverse.app.config import config_to_toml, load_config
from diverse.app.train import build_run, predict_run
from diverse.data.datasets import denormalize, normalize
from diverse.evaluation.evaluate import (
    accuracy_vs_confidence,
    disagreement_extremes,
    evaluate,
    function_distance,
    member_probs,
    write_evaluation,
)
from diverse.evaluation.plots import ensemble_sizes
from diverse.evaluation.report import write_comparison_report, write_report
from diverse.math.cka import cka_matrix

PNG = b"\x89PNG\r\n\x1a\n"


def _two_class(p_class0: list[float]) -> torch.Tensor:
    p = torch.tensor(p_class0, dtype=torch.float64)
    return torch.stack([p, 1 - p], -1)


# ----------------------------------------------------------------- pure figures
def test_accuracy_vs_confidence_hand_made():
    # ensemble means of class 0: 0.875, 0.25, 0.625, 0.4375 -> confidences
    # 0.875, 0.75, 0.625, 0.5625 and predictions 0, 1, 0, 1
    probs = torch.stack([_two_class([1.0, 0.25, 0.75, 0.5]),
                         _two_class([0.75, 0.25, 0.5, 0.375])])
    labels = torch.tensor([0, 0, 0, 1])  # correct: yes, no, yes, yes
    curve = accuracy_vs_confidence(probs, labels, [0.0, 0.625, 0.7, 0.8, 0.9])
    assert curve["thresholds"] == [0.0, 0.625, 0.7, 0.8, 0.9]
    assert curve["retained"] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert curve["accuracy"][:4] == pytest.approx([0.75, 2 / 3, 0.5, 1.0])
    assert math.isnan(curve["accuracy"][4])  # nothing is that confident


def test_accuracy_vs_confidence_matches_a_numpy_loop():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(3, 200, 4, generator=g).mul(2).softmax(-1)
    labels = torch.randint(0, 4, (200,), generator=g)
    taus = [0.1 * i for i in range(11)]
    curve = accuracy_vs_confidence(probs, labels, taus)
    mean = probs.double().mean(0).numpy()
    conf, correct = mean.max(-1), mean.argmax(-1) == labels.numpy()
    for tau, acc, kept in zip(taus, curve["accuracy"], curve["retained"], strict=True):
        keep = conf >= tau
        assert kept == pytest.approx(keep.mean())
        if keep.any():
            assert acc == pytest.approx(correct[keep].mean())
        else:
            assert math.isnan(acc)


def test_function_distance_closed_forms_and_loop():
    one_hot = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]  # (4, 3)
    shifted = torch.eye(3, dtype=torch.float64)[[1, 2, 0, 1]]  # disjoint everywhere
    half = (one_hot + shifted) / 2
    d = function_distance(torch.stack([one_hot, shifted, half, one_hot]))
    expected = torch.tensor([[0, 1, 0.5, 0], [1, 0, 0.5, 1], [0.5, 0.5, 0, 0.5],
                             [0, 1, 0.5, 0]], dtype=torch.float64)
    assert torch.allclose(d, expected)
    probs = torch.randn(4, 30, 5, generator=torch.Generator().manual_seed(1)).softmax(-1)
    loop = np.array([[0.5 * np.abs(a - b).sum(-1).mean() for b in probs.numpy()]
                     for a in probs.numpy()])
    assert np.allclose(function_distance(probs).numpy(), loop, atol=1e-6)


def test_member_probs_averages_draw_major_samples():
    draws = torch.rand(2, 3, 5, 4)  # (draws, members, N, C), stacked draw-major
    samples = draws.reshape(6, 5, 4)
    assert torch.allclose(member_probs(samples, 2), draws.mean(0))
    assert member_probs(samples, 1) is samples


def test_disagreement_extremes_ties_broken_by_entropy():
    # M = 2 members, 5 examples; disagreement with the mean: 0, 0, 0.5, 0, 0.5
    a = _two_class([0.9, 0.6, 0.9, 0.99, 0.55])
    b = _two_class([0.8, 0.7, 0.2, 0.95, 0.4])
    index, value, entropy = disagreement_extremes(torch.stack([a, b]), k=2)
    # lowest: disagreement 0, lowest entropy first (example 3 is the surest, then 0)
    assert index.tolist() == [[3, 0], [4, 2]]  # highest: 0.5 with the larger entropy first
    d = metrics.disagreement_with_mean(torch.stack([a, b]))
    assert value.tolist() == d[index].tolist() == [[0, 0], [0.5, 0.5]]
    h = metrics.predictive_entropy(torch.stack([a, b]))
    assert torch.equal(entropy, h[index]) and entropy[1, 0] > entropy[1, 1]


def test_ensemble_sizes_for_small_multiples():
    assert ensemble_sizes(1) == [1] and ensemble_sizes(2) == [1, 2]
    assert ensemble_sizes(5) == [1, 3, 5] and ensemble_sizes(10) == [1, 5, 10]


# ----------------------------------------------------------------- run reports
def _evaluated(run_dir, overrides, report=True):
    """An untrained (freshly initialized) run, evaluated and reported: fast and enough."""
    cfg = load_config(None, overrides)
    run = build_run(cfg)
    figures, arrays = evaluate(run)
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(config_to_toml(cfg))
    write_evaluation(run_dir, figures, arrays)
    return run, write_report(run_dir) if report else None


IMAGES = ["data.name=digits", "data.train_subset=200", "data.test_subset=60",
          'data.ood=["uniform"]', "model.hidden=[16]", "ensemble.members=3",
          "ensemble.execution=vmap"]


def test_image_run_report_has_disagreement_grids_similarity_and_curves(tmp_path):
    run_dir = tmp_path / "run"
    run, report = _evaluated(run_dir, IMAGES)
    figures = json.loads((run_dir / "metrics.json").read_text())
    with np.load(run_dir / "predictions.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    probs, labels = torch.from_numpy(arrays["probs"]), torch.from_numpy(arrays["labels"])
    # metrics.json agrees with recomputations from predictions.npz and the model
    curve = accuracy_vs_confidence(probs, labels)
    assert figures["confidence_curve"]["retained"] == pytest.approx(curve["retained"])
    assert [a if a is not None else math.nan for a in figures["confidence_curve"]["accuracy"]] \
        == pytest.approx(curve["accuracy"], nan_ok=True)
    assert np.allclose(figures["function_distance"], function_distance(probs).numpy())
    x = run.dataset.x_test[:500]
    with torch.no_grad():
        _out, feats = run.ensemble.features(x, [run.ensemble.module.feature_layers[-1]])
    cka = cka_matrix(next(iter(feats.values())).reshape(3, len(x), -1).double(), "linear")
    assert figures["cka"]["layer"] == "act1" and figures["cka"]["examples"] == 60
    assert np.allclose(figures["cka"]["matrix"], cka.numpy(), atol=1e-6)
    # the disagreement grids: the right images, least / most disagreed-on
    d = metrics.disagreement_with_mean(probs).numpy()
    for key, p, x_set in (("test", probs, run.dataset.x_test),
                          ("ood_uniform", torch.from_numpy(arrays["ood_probs_uniform"]),
                           run.dataset.ood["uniform"])):
        index = arrays[f"disagree_{key}_index"]
        d_set = metrics.disagreement_with_mean(p).numpy()
        assert index.shape == (2, 8) and len(set(index.ravel())) == 16
        assert d_set[index[0]].max() <= d_set[index[1]].min()
        assert d_set[index[0]].max() == d_set.min() and d_set[index[1]].min() <= d_set.max()
        raw = denormalize(x_set, run.dataset.mean, run.dataset.std)[index]
        assert np.allclose(arrays[f"disagree_{key}_images"], raw.numpy())
    assert d.shape == (60,)
    # the report: every new figure present, as a PNG file and embedded in the HTML
    text = report.read_text()
    for png in ("confidence", "entropy_by_size", "member_similarity", "disagreement_test",
                "disagreement_ood_uniform"):
        assert f"(plots/{png}.png)" in text
        assert (run_dir / "plots" / f"{png}.png").read_bytes()[:8] == PNG
    page = (run_dir / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == text.count("![") and all(
        base64.b64decode(b)[:8] == PNG for b in embedded)
    assert "decision_map" not in text  # 2D maps only for 2-feature inputs


def test_two_feature_run_has_a_decision_map_on_the_right_grid(tmp_path):
    run_dir = tmp_path / "run"
    run, report = _evaluated(run_dir, ["data.name=blobs", "data.n_train=100",
                                       "model.hidden=[8]", "ensemble.members=2",
                                       "ensemble.execution=vmap"])
    with np.load(run_dir / "predictions.npz", allow_pickle=False) as npz:
        gx, gy, gp = npz["grid_x"], npz["grid_y"], npz["grid_probs"]
        train_inputs = npz["train_inputs"]
    data = run.dataset
    raw_train = denormalize(data.x_train, data.mean, data.std).numpy()
    assert np.allclose(train_inputs, raw_train, atol=1e-5)
    assert gx[0] < raw_train[:, 0].min() and gx[-1] > raw_train[:, 0].max()
    assert gy[0] < raw_train[:, 1].min() and gy[-1] > raw_train[:, 1].max()
    assert gp.shape == (2, 80, 80, 5)
    # grid_probs[:, i, j] is the prediction at (grid_x[j], grid_y[i]) in data units
    points = torch.tensor([[gx[3], gy[70]], [gx[60], gy[5]]], dtype=torch.float32)
    direct = predict_run(run, normalize(points, data.mean, data.std))["probs"].numpy()
    assert np.allclose(gp[:, 70, 3], direct[:, 0], atol=1e-5)
    assert np.allclose(gp[:, 5, 60], direct[:, 1], atol=1e-5)
    assert "(plots/decision_map.png)" in report.read_text()
    assert (run_dir / "plots" / "decision_map.png").stat().st_size > 10_000


def test_comparison_report_overlays_configs_and_tabulates_similarity(tmp_path):
    runs = {}
    for name, members in (("three", 3), ("two", 2)):
        runs[name] = []
        for seed in (0, 1):
            run_dir = tmp_path / name / f"seed-{seed}"
            _evaluated(run_dir, [*IMAGES, f"ensemble.members={members}", f"train.seed={seed}"],
                       report=False)
            runs[name].append(run_dir)
    path = write_comparison_report(tmp_path, runs, "| config | accuracy |\n|---|---|\n")
    text = path.read_text()
    for png in ("reliability", "confidence", "entropy_ood", "risk_coverage"):
        assert f"(plots/{png}.png)" in text
        assert (tmp_path / "plots" / f"{png}.png").read_bytes()[:8] == PNG
    for name, dirs in runs.items():
        distances, ckas = [], []
        for run_dir in dirs:
            figures = json.loads((run_dir / "metrics.json").read_text())
            off = ~np.eye(len(figures["function_distance"]), dtype=bool)
            distances.append(np.array(figures["function_distance"])[off].mean())
            ckas.append(np.array(figures["cka"]["matrix"], dtype=float)[off].mean())
        assert f"| {name} | {np.mean(distances):.4f} | {np.mean(ckas):.4f} |" in text
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page
