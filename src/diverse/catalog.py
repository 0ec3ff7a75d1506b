"""The one name → method table of training methods.

Read at the configuration edge (``[method] name``). Every method is a
:class:`MethodSpec`: its config dataclass, a builder ``(config, dataset) ->
update`` (see :mod:`diverse.methods`), and two optional hooks for methods
whose members are not plain copies of the configured model:

* ``wrap_model(config, module) -> module`` transforms each freshly built
  member before the members are stacked (mean-field Bayesian layers for
  mutual learning of BNNs, a feature-fusion head, ...);
* ``generator = True`` says the stacked "ensemble" holds one generator of
  members (a hypernetwork): it is built with a single slot whose forward
  returns ``(K, B, ...)`` for K generated members, and prediction flattens
  that axis into the member axis.
* ``finalize(run) -> Samples`` (Bayesian baselines) turns the trained
  members into weight samples of the plain model once training ends (SWAG,
  Laplace and VI draws, SGHMC samples, MC-dropout masked weights);
  :func:`diverse.train.train` saves them in ``RUN/samples`` and prediction
  then goes through them (:mod:`diverse.samples`).

A method config may also carry ``predict_samples`` (Monte Carlo draws per
member at prediction, default 1), read by :func:`diverse.train.predict`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from diverse.feature_repulsion import (
    HECKAConfig,
    HyperHECKAConfig,
    SVGDCKAConfig,
    build_he_cka,
    build_hyper_he_cka,
    build_svgd_cka,
    wrap_hypernetwork,
)
from diverse.forde import FoRDEConfig, build_forde
from diverse.hmc import HMCConfig, build_hmc, finalize_hmc, wrap_hmc
from diverse.laplace_fit import LaplaceConfig, build_laplace, finalize_laplace
from diverse.mc_dropout import (
    MCDropoutConfig,
    build_mc_dropout,
    finalize_mc_dropout,
    wrap_mc_dropout,
)
from diverse.methods import DeepEnsembleConfig, Step, StepResult, deep_ensemble
from diverse.mutual import MutualBNNConfig, build_mutual_bnn, wrap_mutual_peer
from diverse.particles import (
    SVGDConfig,
    WGDConfig,
    build_f_svgd,
    build_f_wgd,
    build_svgd,
    build_wgd,
)
from diverse.sghmc import SGHMCConfig, build_sghmc, finalize_sghmc, wrap_sghmc
from diverse.swag import SWAGConfig, build_swag, finalize_swag, wrap_swag
from diverse.vi import VIConfig, build_vi, finalize_vi, wrap_vi

MethodBuilder = Callable[[Any, Any], Callable[[Step], StepResult]]
ModelWrapper = Callable[[Any, nn.Module], nn.Module]
Finalizer = Callable[[Any], Any]  # (run) -> diverse.samples.Samples


class MethodSpec(NamedTuple):
    config: type
    build: MethodBuilder
    wrap_model: ModelWrapper | None = None
    generator: bool = False
    finalize: Finalizer | None = None


METHODS: dict[str, MethodSpec] = {
    "de": MethodSpec(DeepEnsembleConfig, deep_ensemble),
    "svgd": MethodSpec(SVGDConfig, build_svgd),
    "wgd": MethodSpec(WGDConfig, build_wgd),
    "f-svgd": MethodSpec(SVGDConfig, build_f_svgd),
    "f-wgd": MethodSpec(WGDConfig, build_f_wgd),
    "forde": MethodSpec(FoRDEConfig, build_forde),
    "he-cka": MethodSpec(HECKAConfig, build_he_cka),
    "svgd-cka": MethodSpec(SVGDCKAConfig, build_svgd_cka),
    "hyper-he-cka": MethodSpec(HyperHECKAConfig, build_hyper_he_cka, wrap_hypernetwork,
                               generator=True),
    "mutual-bnn": MethodSpec(MutualBNNConfig, build_mutual_bnn,
                             lambda cfg, module: wrap_mutual_peer(cfg.method, module)),
    "mc-dropout": MethodSpec(MCDropoutConfig, build_mc_dropout, wrap_mc_dropout,
                             finalize=finalize_mc_dropout),
    "vi": MethodSpec(VIConfig, build_vi, wrap_vi, finalize=finalize_vi),
    "swag": MethodSpec(SWAGConfig, build_swag, wrap_swag, finalize=finalize_swag),
    "sghmc": MethodSpec(SGHMCConfig, build_sghmc, wrap_sghmc, finalize=finalize_sghmc),
    "laplace": MethodSpec(LaplaceConfig, build_laplace, finalize=finalize_laplace),
    "hmc": MethodSpec(HMCConfig, build_hmc, wrap_hmc, finalize=finalize_hmc),
}


def predict_samples(method_cfg: Any) -> int:
    """Monte Carlo draws per member at prediction (``predict_samples``, default 1)."""
    return int(getattr(method_cfg, "predict_samples", 1))
