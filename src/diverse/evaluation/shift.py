"""Distribution-shift protocols on a trained image classifier ensemble.

* Corruptions (:mod:`diverse.data.corruptions`, CIFAR-10-C style): accuracy, NLL
  and ECE of the ensemble for every corruption type and severity 1–5, and
  their mean over types per severity.
* Rotations (D'Angelo & Fortuin 2021's RotatedMNIST protocol): accuracy, NLL, ECE and the
  mean predictive entropy of test images rotated by 0–180°.

Corruptions act on the images in their own [0, 1] range: the normalized test
inputs are mapped back, corrupted, and normalized again with the training
statistics. Everything is deterministic under ``seed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from diverse import metrics
from diverse.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt, rotated_sets
from diverse.data.datasets import denormalize, normalize
from diverse.errors import UserError
from diverse.evaluation.prediction import predict_run
from diverse.progress import Progress

if TYPE_CHECKING:  # the application layer's run; evaluation only reads it
    from diverse.app.train import Run


def _figures(run: Run, x_unit: Tensor, labels: Tensor) -> dict[str, float]:
    data = run.dataset
    x = normalize(x_unit, data.mean, data.std)
    probs = predict_run(run, x)["probs"]
    return {"accuracy": float(metrics.accuracy(probs, labels)),
            "nll": float(metrics.nll(probs, labels)),
            "ece": float(metrics.ece(probs, labels)),
            "entropy": float(metrics.predictive_entropy(probs).mean())}


def shift_evaluation(run: Run, n: int = 2000, seed: int = 0,
                     show_progress: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Corruption and rotation figures on the first ``n`` test images.

    Returns ``(figures, arrays)``: ``figures["corruptions"][type][severity]`` and
    ``figures["corruptions"]["mean"][severity]`` hold accuracy/NLL/ECE/entropy;
    ``figures["rotations"]`` holds lists against ``angles``; ``arrays`` has
    ``shift_examples`` ``(types, 5, C, H, W)`` (the first test image under every
    corruption) for the report.
    """
    data = run.dataset
    if data.task != "classification" or data.x_test.dim() != 4:
        raise UserError(f"shift evaluation needs image classification data; "
                        f"{data.name!r} has inputs of shape {tuple(data.x_test.shape[1:])}")
    x_unit = denormalize(data.x_test[:n], data.mean, data.std).clamp(0.0, 1.0)
    labels = data.y_test[:n]
    names = sorted(CORRUPTIONS)
    angles = list(range(0, 181, 15))
    bar = Progress(len(names) * len(SEVERITIES) + len(angles), "shift", enabled=show_progress)
    done = 0
    corruptions: dict[str, Any] = {}
    examples = np.zeros((len(names), len(SEVERITIES), *x_unit.shape[1:]), dtype=np.float32)
    for i, name in enumerate(names):
        corruptions[name] = {}
        for j, severity in enumerate(SEVERITIES):
            shifted = corrupt(x_unit, name, severity, seed=seed)
            corruptions[name][str(severity)] = _figures(run, shifted, labels)
            examples[i, j] = shifted[0].numpy()
            done += 1
            bar.update(done, corruption=name)
    corruptions["mean"] = {
        str(s): {k: float(np.mean([corruptions[name][str(s)][k] for name in names]))
                 for k in ("accuracy", "nll", "ece", "entropy")}
        for s in SEVERITIES}
    rotations: dict[str, list[float]] = {"angles": [float(a) for a in angles]}
    for angle, rotated in rotated_sets(x_unit, angles).items():
        for k, v in _figures(run, rotated, labels).items():
            rotations.setdefault(k, []).append(v)
        done += 1
        bar.update(done, angle=angle)
    bar.close()
    figures = {"shift_n": len(labels), "corruptions": corruptions, "rotations": rotations}
    return figures, {"shift_examples": examples, "shift_names": np.array(names)}
