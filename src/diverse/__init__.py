"""diverse: diverse Bayesian deep ensembles in PyTorch.

The public entry points load lazily (``import diverse`` stays cheap):

* :func:`diverse.load` — a trained run directory → :class:`diverse.predictor.Predictor`
  (``predict(x)``, ``predict_set(x, alpha)``).
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {"load": "diverse.predictor", "Predictor": "diverse.predictor",
         "Prediction": "diverse.predictor"}
__all__ = ["Prediction", "Predictor", "__version__", "load"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diverse' has no attribute {name!r}")
