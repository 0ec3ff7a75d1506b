"""diverse: diverse Bayesian deep ensembles in PyTorch.

The public API (loaded lazily, so ``import diverse`` stays cheap):

* your model and data: :class:`Ensemble` (an ``nn.Module`` of M stacked members of
  any module factory), :class:`TrainingData` (what a method may precompute from
  your tensors or ``DataLoader``), :class:`TensorBatches` (in-memory batches);
* methods: :func:`build_method` on a config dataclass (:class:`DeepEnsembleConfig`,
  :class:`SVGDConfig`, :class:`WGDConfig`, :class:`FoRDEConfig`,
  :class:`HECKAConfig`, :class:`SVGDCKAConfig`, :class:`HyperHECKAConfig`,
  :class:`MutualBNNConfig`, :class:`MCDropoutConfig`, :class:`VIConfig`,
  :class:`SWAGConfig`, :class:`SGHMCConfig`, :class:`LaplaceConfig`,
  :class:`HMCConfig`) → :class:`Method`; :data:`METHODS`, the method table;
* training: :func:`fit` over any iterable of ``(x, y)`` batches, with
  :class:`TrainConfig`, :class:`Callback` hooks, checkpoints and exact resume;
* prediction: :func:`load` (a run directory → :class:`Predictor`:
  ``predict(x)``, ``predict_set(x, alpha)``), :func:`predict`;
* :mod:`diverse.metrics`, :mod:`diverse.calibration`, :mod:`diverse.conformal`,
  :mod:`diverse.selective`, :mod:`diverse.confidence` (pure functions of tensors);
* :mod:`diverse.lightning` (``pip install 'diverse[lightning]'``): a
  ``LightningModule`` for Lightning's ``Trainer``.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": "diverse.predictor", "Predictor": "diverse.predictor",
    "Prediction": "diverse.predictor",
    "fit": "diverse.loop", "FitResult": "diverse.loop", "Callback": "diverse.loop",
    "TensorBatches": "diverse.loop", "predict": "diverse.prediction",
    "Ensemble": "diverse.ensemble",
    "Method": "diverse.catalog", "build_method": "diverse.catalog", "METHODS": "diverse.catalog",
    "TrainingData": "diverse.methods", "DeepEnsembleConfig": "diverse.methods",
    "TrainConfig": "diverse.config",
    "SVGDConfig": "diverse.particles", "WGDConfig": "diverse.particles",
    "FoRDEConfig": "diverse.forde",
    "HECKAConfig": "diverse.feature_repulsion", "SVGDCKAConfig": "diverse.feature_repulsion",
    "HyperHECKAConfig": "diverse.feature_repulsion",
    "MutualBNNConfig": "diverse.mutual", "MCDropoutConfig": "diverse.mc_dropout",
    "VIConfig": "diverse.vi", "SWAGConfig": "diverse.swag", "SGHMCConfig": "diverse.sghmc",
    "LaplaceConfig": "diverse.laplace_fit", "HMCConfig": "diverse.hmc",
}
__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diverse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
