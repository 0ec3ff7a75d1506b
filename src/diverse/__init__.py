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
* members of a pretrained model: ``members_as=`` :class:`Full`, :class:`Head`,
  :class:`LoRA` (through ``peft``), :class:`BatchEnsemble` (:mod:`diverse.nets.forms`);
  members of different architectures: :class:`Heterogeneous` groups;
* training: :func:`fit` over any iterable of ``(x, y)`` batches, with
  :class:`TrainConfig`, :class:`Callback` hooks, checkpoints and exact resume; or your
  own loop around :func:`train_step` (one update: :class:`Step` → :class:`StepResult`)
  on a :class:`LogPosterior` target;
* prediction: :func:`load` (a run directory → :class:`Predictor`:
  ``predict(x)``, ``predict_set(x, alpha)``), :func:`predict`;
* :mod:`diverse.metrics`, :mod:`diverse.math.calibration`, :mod:`diverse.metrics.conformal`,
  :mod:`diverse.metrics.selective`, :mod:`diverse.math.confidence` (pure functions of tensors);
* :mod:`diverse.app.lightning` (``pip install 'diverse[lightning]'``): a
  ``LightningModule`` for Lightning's ``Trainer``.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": "diverse.app.predictor",
    "Predictor": "diverse.app.predictor",
    "Prediction": "diverse.app.predictor",
    "fit": "diverse.app.loop",
    "FitResult": "diverse.app.loop",
    "RunOptions": "diverse.app.loop",
    "Callback": "diverse.app.loop",
    "TensorBatches": "diverse.app.loop",
    "predict": "diverse.evaluation.prediction",
    "Ensemble": "diverse.nets.ensemble",
    "Method": "diverse.methods.catalog",
    "build_method": "diverse.methods.catalog",
    "METHODS": "diverse.methods.catalog",
    "TrainingData": "diverse.methods.base",
    "Step": "diverse.methods.base",
    "StepResult": "diverse.methods.base",
    "LogPosterior": "diverse.methods.base",
    "MethodConfig": "diverse.methods.base",
    "train_step": "diverse.methods.train_step",
    "Full": "diverse.nets.forms",
    "Head": "diverse.nets.forms",
    "LoRA": "diverse.nets.forms",
    "BatchEnsemble": "diverse.nets.forms",
    "Heterogeneous": "diverse.nets.heterogeneous",
    "DeepEnsembleConfig": "diverse.methods.base",
    "TrainConfig": "diverse.app.config",
    "SVGDConfig": "diverse.methods.particles",
    "WGDConfig": "diverse.methods.particles",
    "FoRDEConfig": "diverse.methods.forde",
    "HECKAConfig": "diverse.methods.feature_repulsion",
    "SVGDCKAConfig": "diverse.methods.feature_repulsion",
    "HyperHECKAConfig": "diverse.methods.feature_repulsion",
    "MutualBNNConfig": "diverse.methods.mutual",
    "MCDropoutConfig": "diverse.methods.mc_dropout",
    "VIConfig": "diverse.methods.vi",
    "SWAGConfig": "diverse.methods.swag",
    "SGHMCConfig": "diverse.methods.sghmc",
    "LaplaceConfig": "diverse.methods.laplace_fit",
    "HMCConfig": "diverse.methods.hmc",
}
__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diverse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
