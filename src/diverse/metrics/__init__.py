"""Evaluation metrics for ensembles: pure functions on tensors, by topic.

* :mod:`~diverse.metrics.classification` — accuracy, NLL, Brier, the summary;
* :mod:`~diverse.metrics.calibration` — reliability diagram, ECE, adaptive ECE;
* :mod:`~diverse.metrics.uncertainty` — entropies, mutual information, disagreement;
* :mod:`~diverse.metrics.ood` — OOD detection (AUROC, AUPR, FPR@95);
* :mod:`~diverse.metrics.regression` — RMSE, mixture NLL, calibration error;
* :mod:`~diverse.metrics.selective` — risk–coverage, AURC (``import diverse.metrics.selective``);
* :mod:`~diverse.metrics.conformal` — conformal prediction sets.

Every metric of the first five is also a name of this package (``metrics.accuracy``).

Conventions
-----------
* Classification: member probabilities ``probs`` have shape ``(M, N, C)`` (``M`` members,
  ``N`` examples, ``C`` classes; every row sums to 1) and ``labels`` have shape ``(N,)``
  (integer class indices). An ensemble of one is ``probs.unsqueeze(0)``.
* Regression: member means and standard deviations ``(M, N)`` with targets ``(N,)``, or
  ``(M, N, D)`` with targets ``(N, D)``; see :func:`rmse` for how ``D`` is handled.
* Inputs may be tensors or NumPy arrays (converted without a copy where possible).
* Everything is computed in float64 on the input's device. Scalar metrics return 0-dim
  tensors, per-example scores return ``(N,)`` tensors, the ``*_metrics`` summaries and
  :func:`ood_detection` return ``dict[str, float]``.
* Logarithms are natural (entropies in nats).
* ``argmax`` ties resolve to the lowest class index (``torch.argmax``, ``np.argmax``).
"""

from diverse.metrics._checks import (  # noqa: F401 (the checks: shared with diverse.math)
    _check_bins,
    _check_labels,
    _check_nonempty,
    _check_probs,
    _tensor,
    mean_probs,
)
from diverse.metrics.calibration import adaptive_ece, ece, reliability_diagram
from diverse.metrics.classification import (
    accuracy,
    brier,
    classification_metrics,
    nll,
    nll_from_logits,
)
from diverse.metrics.ood import ood_detection, ood_metrics
from diverse.metrics.regression import (
    gaussian_mixture_nll,
    predictive_std,
    regression_calibration_error,
    regression_metrics,
    rmse,
)
from diverse.metrics.uncertainty import (
    disagreement,
    disagreement_with_mean,
    expected_entropy,
    mutual_information,
    predictive_entropy,
)

__all__ = [
    "accuracy",
    "adaptive_ece",
    "brier",
    "classification_metrics",
    "disagreement",
    "disagreement_with_mean",
    "ece",
    "expected_entropy",
    "gaussian_mixture_nll",
    "mean_probs",
    "mutual_information",
    "nll",
    "nll_from_logits",
    "ood_detection",
    "ood_metrics",
    "predictive_entropy",
    "predictive_std",
    "regression_calibration_error",
    "regression_metrics",
    "reliability_diagram",
    "rmse",
]
