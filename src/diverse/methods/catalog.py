"""The one name → method table: every fact about a training method, stated once.

Read at the configuration edge (``[method] name``) and by :func:`diverse.fit`.
Every method is a :class:`MethodSpec`: its config dataclass, a builder
``(config, TrainingData) -> update`` (see :mod:`diverse.methods.base`), optional hooks
for methods whose members are not plain copies of the user's model (a model
wrapper applied before the members are stacked; a finalizer that turns trained
members into weight samples), and its facts (how it predicts, whether it is a
sampler, shardable, function-space, double-backward, feature-space). Code
elsewhere asks the table, never a set of names.

Adding a method: its module (config dataclass, builder, hooks), one line here,
one row in the test table (``tests/method_table.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from diverse.errors import UserError
from diverse.methods.base import (
    DeepEnsembleConfig,
    Finish,
    MethodConfig,
    Step,
    StepResult,
    TrainingData,
    deep_ensemble,
)
from diverse.methods.feature_repulsion import (
    HECKAConfig,
    HyperHECKAConfig,
    SVGDCKAConfig,
    build_he_cka,
    build_hyper_he_cka,
    build_svgd_cka,
    wrap_hypernetwork,
)
from diverse.methods.forde import FoRDEConfig, build_forde
from diverse.methods.hmc import HMCConfig, build_hmc, finalize_hmc, init_hmc
from diverse.methods.laplace_fit import LaplaceConfig, build_laplace, finalize_laplace
from diverse.methods.mc_dropout import (
    MCDropoutConfig,
    build_mc_dropout,
    finalize_mc_dropout,
    wrap_mc_dropout,
)
from diverse.methods.mutual import MutualBNNConfig, build_mutual_bnn, wrap_mutual_peer
from diverse.methods.particles import (
    SVGDConfig,
    WGDConfig,
    build_f_svgd,
    build_f_wgd,
    build_svgd,
    build_wgd,
)
from diverse.methods.sghmc import SGHMCConfig, build_sghmc, finalize_sghmc, init_sghmc
from diverse.methods.swag import SWAGConfig, build_swag, finalize_swag, init_swag
from diverse.methods.vi import VIConfig, build_vi, finalize_vi, wrap_vi
from diverse.nets.ensemble import Ensemble
from diverse.nets.forms import FORMS, MemberForm
from diverse.nets.heterogeneous import (
    GroupSamples,
    HeteroEnsemble,
    Heterogeneous,
    build_heterogeneous,
    join_groups,
    split_groups,
)
from diverse.nets.samples import Samples

MethodBuilder = Callable[[Any, TrainingData | None], Callable[[Step], StepResult]]
# (the builders, wrappers, finalizers and state inits each take their own config class)
StateInit = Callable[[Any, Ensemble], dict[str, Tensor]]  # (cfg, ensemble) -> {name: (M, ...)}
#: every ensemble form (:mod:`diverse.nets.forms`)
ALL_FORMS: tuple[str, ...] = FORMS
#: the forms without shared trainable tensors (a sampler moves only member parameters)
NO_SHARED_TRAINING: tuple[str, ...] = ("full", "head", "lora")
FULL_ONLY: tuple[str, ...] = ("full",)
#: members of different architectures (:mod:`diverse.nets.heterogeneous`): for the methods
#: that compare members through outputs, input gradients or features
HETEROGENEOUS = "heterogeneous"
THROUGH_FUNCTIONS: tuple[str, ...] = (*FORMS, HETEROGENEOUS)
ModelWrapper = Callable[[Any, nn.Module, int, int], nn.Module]  # (cfg, module, members, seed)
Finalizer = Callable[[Any, Ensemble, Finish], Samples]
#: how a method predicts (``MethodSpec.prediction``); :class:`diverse.Prediction` is a result
PredictionKind = Literal["members", "monte-carlo", "weight-samples"]


class MethodSpec(NamedTuple):
    """Every fact about a method, stated once.

    Attributes:
        config: its config dataclass (``[method]`` section).
        build: ``(config, TrainingData | None) -> update``.
        wrap_model: ``(config, module, members, seed) -> module``, applied to every
            freshly built member before stacking, or None.
        finalize: ``(config, ensemble, Finish) -> Samples`` after training, or None.
        generator: the stacked "ensemble" is one generator of members (hypernetwork).
        prediction: how it predicts — ``"members"`` (one output per member),
            ``"monte-carlo"`` (``predict_samples`` stochastic forwards per member) or
            ``"weight-samples"`` (through the weight samples ``finalize`` drew).
        sampler: the update moves the parameters itself (``grads = None``); no
            optimizer step is taken.
        shardable: its update gathers what it needs through ``Step.comm`` (several
            processes, :mod:`diverse.nets.distributed`).
        function_space: draws context points / prior functions that must agree
            across processes.
        double_backward: differentiates through input gradients (never compiled).
        feature_space: compares members' features at named layers
            (needs ``feature_layers`` on a custom module).
        needs_prior: samples the posterior under a proper prior (``prior_std > 0``).
        init_state: ``(config, ensemble) -> {name: (M, ...)}``, the method's explicit
            state (SWAG moments, SGHMC momenta, HMC chains), or None.
        forms: the ensemble forms it trains (``[ensemble] members_as``): a method that
            wraps or generates its members needs whole members (``full``); a sampler
            moves only member parameters (no shared trainable tensors).
        independent: its members do not interact, so on a heterogeneous ensemble it runs
            group by group (its state, update and weight samples per group).
    """

    config: type
    build: MethodBuilder
    wrap_model: ModelWrapper | None = None
    finalize: Finalizer | None = None
    generator: bool = False
    prediction: PredictionKind = "members"
    sampler: bool = False
    shardable: bool = False
    function_space: bool = False
    double_backward: bool = False
    feature_space: bool = False
    needs_prior: bool = False
    init_state: StateInit | None = None
    forms: tuple[str, ...] = ALL_FORMS
    independent: bool = False


def _mutual_peer(cfg: MutualBNNConfig, module: nn.Module, _members: int, _seed: int) -> nn.Module:
    return wrap_mutual_peer(cfg, module)


METHODS: dict[str, MethodSpec] = {
    "de": MethodSpec(DeepEnsembleConfig, deep_ensemble, shardable=True,
                     forms=THROUGH_FUNCTIONS),
    "svgd": MethodSpec(SVGDConfig, build_svgd, shardable=True),
    "wgd": MethodSpec(WGDConfig, build_wgd, shardable=True),
    "f-svgd": MethodSpec(SVGDConfig, build_f_svgd, shardable=True, function_space=True,
                         forms=THROUGH_FUNCTIONS),
    "f-wgd": MethodSpec(WGDConfig, build_f_wgd, shardable=True, function_space=True,
                        forms=THROUGH_FUNCTIONS),
    "forde": MethodSpec(FoRDEConfig, build_forde, shardable=True, double_backward=True,
                        forms=THROUGH_FUNCTIONS),
    "he-cka": MethodSpec(HECKAConfig, build_he_cka, feature_space=True,
                         forms=THROUGH_FUNCTIONS),
    "svgd-cka": MethodSpec(SVGDCKAConfig, build_svgd_cka, feature_space=True),
    "hyper-he-cka": MethodSpec(HyperHECKAConfig, build_hyper_he_cka, wrap_hypernetwork,
                               generator=True, feature_space=True, forms=FULL_ONLY),
    "mutual-bnn": MethodSpec(MutualBNNConfig, build_mutual_bnn, _mutual_peer,
                             prediction="monte-carlo", feature_space=True, forms=FULL_ONLY),
    "mc-dropout": MethodSpec(MCDropoutConfig, build_mc_dropout, wrap_mc_dropout,
                             finalize_mc_dropout, prediction="weight-samples",
                             forms=(*FULL_ONLY, HETEROGENEOUS), independent=True),
    "vi": MethodSpec(VIConfig, build_vi, wrap_vi, finalize_vi, prediction="weight-samples",
                     forms=FULL_ONLY),
    "swag": MethodSpec(SWAGConfig, build_swag, finalize=finalize_swag, init_state=init_swag,
                       prediction="weight-samples", forms=THROUGH_FUNCTIONS, independent=True),
    "sghmc": MethodSpec(SGHMCConfig, build_sghmc, finalize=finalize_sghmc,
                        init_state=init_sghmc, prediction="weight-samples", sampler=True,
                        forms=NO_SHARED_TRAINING),
    # BatchEnsemble: laplace-torch finds no Linear layer of its own in the fast weights
    "laplace": MethodSpec(LaplaceConfig, build_laplace, finalize=finalize_laplace,
                          prediction="weight-samples",
                          forms=(*NO_SHARED_TRAINING, HETEROGENEOUS), independent=True),
    "hmc": MethodSpec(HMCConfig, build_hmc, finalize=finalize_hmc, init_state=init_hmc,
                      prediction="weight-samples", sampler=True, needs_prior=True,
                      forms=NO_SHARED_TRAINING),
}


HETERO_METHODS = tuple(name for name, spec in METHODS.items() if HETEROGENEOUS in spec.forms)


def check_training(name: str, prior_std: float, weight_decay: float) -> None:
    """UserError when the training settings contradict the method's facts: a sampler
    takes no optimizer step (so weight decay would silently do nothing), and a
    method that needs a proper prior needs ``prior_std > 0``."""
    spec = METHODS[name]
    if spec.sampler and weight_decay > 0:
        raise UserError(f"{name}: [train] weight_decay = {weight_decay}: must be 0 (the sampler "
                        "moves the weights itself; use [train] prior_std)")
    if spec.needs_prior and not prior_std > 0:
        raise UserError(f"{name}: [train] prior_std = {prior_std}: it samples the posterior "
                        "under a proper Gaussian prior; set [train] prior_std > 0 (e.g. 1.0)")


def method_name(cfg: MethodConfig) -> str:
    """The table name of a method config (its ``name`` field), checked against the table."""
    name = getattr(cfg, "name", None)
    if name not in METHODS:
        raise UserError(f"[method] name = {name!r}: allowed {', '.join(METHODS)}")
    spec = METHODS[name]
    if not isinstance(cfg, spec.config):
        raise UserError(f"[method] name = {name!r} takes a {spec.config.__name__}, got "
                        f"{type(cfg).__name__}")
    return name


def predict_samples(method_cfg: MethodConfig) -> int:
    """Monte Carlo draws per member at prediction (``predict_samples``, default 1)."""
    return int(getattr(method_cfg, "predict_samples", 1))


def _group_by_group(update: Callable[[Step], StepResult]) -> Callable[[Step], StepResult]:
    """An independent method's update on a heterogeneous ensemble: run on every group with
    its own state, results joined in group order (exact: its members do not interact)."""

    def run(step: Step) -> StepResult:
        ens = step.ensemble
        if not isinstance(ens, HeteroEnsemble):
            return update(step)
        states = split_groups(step.state, len(ens.groups))
        parts = [update(Step(g, step.x, step.y, step.likelihood, step.n_train, step.prior_std,
                             step.progress, step.index, step.comm, st))
                 for g, st in zip(ens.groups, states, strict=True)]
        grads = (None if parts[0].grads is None
                 else join_groups([p.grads or {} for p in parts]))
        logs = {k: sum(float(p.logs[k]) for p in parts) / len(parts) for k in parts[0].logs}
        return StepResult(loss=torch.cat([p.loss for p in parts]),
                          outputs=torch.cat([p.outputs for p in parts]), grads=grads, logs=logs,
                          state=step.state)

    return run


def _prediction_only(step: Step) -> StepResult:
    raise UserError("this method was built for prediction only (Method(..., for_training="
                    "False)); build it with build_method(config, data) to train")


class Method:
    """A training method built from its config: the update plus the table's facts.

    Build it with :func:`build_method`; make its members with :meth:`ensemble`
    (which applies the method's model wrapper, if any, to each member of the
    user's factory); train it with :func:`diverse.fit`.

    Attributes:
        name: the table name. config: the config dataclass. spec: the
        :class:`MethodSpec`. update: ``Step -> StepResult``. data: the
        :class:`TrainingData` it was built with (None if none).
    """

    def __init__(self, config: MethodConfig, data: TrainingData | None = None, *,
                 for_training: bool = True) -> None:
        self.name = method_name(config)
        self.config = config
        self.spec = METHODS[self.name]
        self.data = data
        # a loaded run only predicts: its update (which may precompute from the
        # training data) is not built
        self.update: Callable[[Step], StepResult] = (self.spec.build(config, data) if for_training
                                                     else _prediction_only)
        if self.spec.independent and for_training:
            self.update = _group_by_group(self.update)

    def ensemble(self, factory: Callable[[], nn.Module] | nn.Module, members: int, *,
                 seed: int = 0, execution: str = "auto", device: Any = "cpu",
                 member_offset: int = 0, members_as: MemberForm | None = None) -> Ensemble:
        """``members`` members of ``factory()`` (each wrapped as the method needs),
        initialized from ``seed``, in the form ``members_as`` (default: full copies;
        :mod:`diverse.nets.forms`). A generator method (hypernetwork) holds one slot
        that generates ``members`` members per step."""
        if isinstance(factory, Heterogeneous):
            if HETEROGENEOUS not in self.spec.forms:
                raise UserError(f"method {self.name!r} does not train heterogeneous members: "
                                "it compares members in one weight space; heterogeneous "
                                f"ensembles train with {', '.join(HETERO_METHODS)}")
            hetero = build_heterogeneous(factory, self.ensemble, members, seed=seed,
                                         execution=execution, device=device)
            hetero.built_for = self.name
            return hetero
        wrap = self.spec.wrap_model
        cfg = self.config
        form = "full" if members_as is None else members_as.name
        if form not in self.spec.forms:
            raise UserError(f"method {self.name!r} does not train members_as = {form!r}: it "
                            f"supports {', '.join(self.spec.forms)}")
        if members_as is not None and form != "full":
            ens = Ensemble(factory, members, seed=seed, execution=execution,
                           member_offset=member_offset, device=device, members_as=members_as)
            ens.built_for = self.name
            return ens

        def member() -> nn.Module:
            module = factory()
            if not isinstance(module, nn.Module):
                raise UserError(f"the model factory returned {type(module).__name__}, not an "
                                "nn.Module")
            return module if wrap is None else wrap(cfg, module, members, seed)

        slots = 1 if self.spec.generator else members
        execution = "loop" if self.spec.generator else execution  # one slot: nothing to vmap
        ens = Ensemble(member, slots, seed=seed, execution=execution,
                       member_offset=member_offset, device=device)
        ens.base_factory = factory
        ens.built_for = self.name
        return ens

    def check_ensemble(self, ensemble: Ensemble) -> None:
        """UserError unless ``ensemble`` can train with this method: a method that wraps
        its members (or generates them) needs the ensemble :meth:`ensemble` made."""
        if ensemble.form.name not in self.spec.forms:
            raise UserError(f"method {self.name!r} does not train members_as = "
                            f"{ensemble.form.name!r}: it supports {', '.join(self.spec.forms)}")
        needs_own = self.spec.wrap_model is not None or self.spec.generator
        if needs_own and ensemble.built_for != self.name:
            built = f"for {ensemble.built_for!r}" if ensemble.built_for else "directly"
            raise UserError(f"method {self.name!r} needs its own members: build the ensemble "
                            f"with method.ensemble(factory, members) (this one was built "
                            f"{built})")

    def init_state(self, ensemble: Ensemble) -> dict[str, Tensor]:
        """The method's initial state ``{name: (M, ...)}`` for ``ensemble`` (``{}`` if none);
        of a heterogeneous ensemble, every group's under ``"group<i>/<name>"``."""
        if self.spec.init_state is None:
            return {}
        if isinstance(ensemble, HeteroEnsemble):
            return join_groups([self.init_state(g) for g in ensemble.groups])
        return self.spec.init_state(self.config, ensemble)

    def finalize(self, ensemble: Ensemble, seed: int, prior_std: float,
                 state: dict[str, Tensor] | None = None) -> Samples | None:
        """The weight samples of a Bayesian baseline after training (None for the others)."""
        if self.spec.finalize is None:
            return None
        if isinstance(ensemble, HeteroEnsemble):  # every group's own samples
            states = split_groups(state or {}, len(ensemble.groups))
            return GroupSamples(tuple(self.finalize(g, seed, prior_std, st)
                                      for g, st in zip(ensemble.groups, states, strict=True)))
        finish = Finish(ensemble.plain_model(), seed, prior_std, self.data, dict(state or {}))
        return self.spec.finalize(self.config, ensemble, finish)

    def prediction_draws(self) -> int:
        """Forwards per member at prediction: ``predict_samples`` for a Monte Carlo
        method (and a weight-sample method before its samples exist), else 1."""
        return predict_samples(self.config) if self.spec.prediction != "members" else 1

    def __repr__(self) -> str:
        return f"Method({self.config!r})"


def build_method(config: MethodConfig, data: TrainingData | None = None) -> Method:
    """The :class:`Method` of a method config dataclass (e.g. ``SVGDConfig()``).

    ``data`` is what the method may precompute from the training data (FoRDE's
    PCA lengthscales, HE-CKA's outlier pool, HMC's full batch, Laplace's
    curvature loader): :class:`diverse.methods.base.TrainingData` of tensors or of a
    ``DataLoader``.
    """
    return Method(config, data)
