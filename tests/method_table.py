"""The one test table of training methods: a row per entry of ``diverse.METHODS``.

Each row holds what the two method suites need: ``api``, the config dataclass the
Python-API suite (``tests/app/test_fit_api.py``: a plain ``nn.Sequential``, a
``DataLoader``, ``fit``, ``load``) builds the method from; ``cli``, the ``--set``
overrides of the CLI suite (``tests/methods/test_methods.py``: digits, vmap = loop,
determinism, exact resume). Adding a method adds one row here; both suites fail
until it exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import diverse


@dataclass(frozen=True)
class Row:
    api: object
    cli: tuple[str, ...] = ()
    dropout: bool = False  # the API suite's module needs dropout (MC dropout's masks)


ROWS: dict[str, Row] = {
    "de": Row(diverse.DeepEnsembleConfig()),
    "svgd": Row(diverse.SVGDConfig()),
    "wgd": Row(diverse.WGDConfig(estimator="ssge"), ("method.estimator=sge",)),
    "f-svgd": Row(diverse.SVGDConfig(name="f-svgd", output="logits"),
                  ("method.context_points=8", "method.output=logits")),
    "f-wgd": Row(diverse.WGDConfig(name="f-wgd"), ("method.estimator=ssge",)),
    "forde": Row(diverse.FoRDEConfig(), ("method.lengthscales=pca",)),
    "he-cka": Row(diverse.HECKAConfig(layers=("2", "output"), outliers=4, outlier_pool=16),
                  ("method.warmup_steps=5",)),
    "svgd-cka": Row(diverse.SVGDCKAConfig(layers=("2", "output"))),
    "hyper-he-cka": Row(diverse.HyperHECKAConfig(layers=("2", "output"), z_dim=4, hidden=8,
                                                 predict_members=3)),
    # σ ≈ 0 in the CLI suite: vmap = loop
    "mutual-bnn": Row(diverse.MutualBNNConfig(feature_layers=("2",), predict_samples=2),
                      ("method.init_rho=-30", "method.kl_weight=0.01")),
    # p ≈ 0 in the CLI suite: vmap and loop draw different masks, here all ones
    "mc-dropout": Row(diverse.MCDropoutConfig(predict_samples=3),
                      ("model.dropout=1e-6", "method.predict_samples=2"), dropout=True),
    "vi": Row(diverse.VIConfig(predict_samples=3),
              ("method.init_rho=-30", "method.kl_weight=0.01", "method.predict_samples=2")),
    "swag": Row(diverse.SWAGConfig(swa_start=0.3, swa_frequency=1, rank=2, predict_samples=3),
                ("method.swa_frequency=2", "method.rank=3", "method.predict_samples=2")),
    "sghmc": Row(diverse.SGHMCConfig(burn_in=0.3, cycles=1, predict_samples=2),
                 ("method.predict_samples=2",)),
    "laplace": Row(diverse.LaplaceConfig(predict_samples=3, marglik_steps=5),
                   ("method.marglik_steps=20", "method.predict_samples=2")),
    "hmc": Row(diverse.HMCConfig(leapfrog_steps=3, warmup=0.5, predict_samples=2),
               ("method.leapfrog_steps=4", "method.predict_samples=2", "method.step_size=0.005")),
}
