"""Laplace approximation through the laplace-torch library (Daxberger et al. 2021).

Training is the deep-ensemble (MAP) update. Afterwards (``finalize``) every
member m is handed to laplace-torch as an ordinary module
(:meth:`diverse.nets.ensemble.Ensemble.member`):

    la = Laplace(member, "classification", subset_of_weights=..., hessian_structure=...)
    la.fit(DataLoader(training set))
    la.optimize_prior_precision(method="marglik")
    θ_1..θ_S = la.sample(S)                          # N(θ_MAP, P⁻¹)

with P = Σ_n GGN_n + τ I (laplace-torch's default curvature backend, curvlinops'
exact GGN, diagonal or Kronecker-factored). τ starts at 1/σ² of the run's
``[train] prior_std`` (1 if none) and is tuned by maximizing the Laplace
marginal likelihood. ``subset_of_weights = "last_layer"`` treats only the last
``nn.Linear`` (found by name, in module order) as random and keeps the other
weights at the MAP. Nothing of the approximation itself is reimplemented here:
this module only moves weights in and out of the library.

The single-mode form is M = 1; multi-mode fits one Laplace per member (a loop:
laplace-torch works on one module). ``fit_subset`` > 0 fits the curvature on
the first n training examples only (for speed on large data sets; the
likelihood is then that of n examples, as laplace-torch counts the loader's
data set). Classification only (laplace-torch's regression likelihood is
homoscedastic Gaussian, while our regression heads may learn the noise).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from diverse.errors import UserError
from diverse.methods.base import (
    DeepEnsembleConfig,
    Finish,
    Step,
    StepResult,
    TrainingData,
    deep_ensemble,
)
from diverse.nets.ensemble import Ensemble, member_seed
from diverse.nets.samples import Params, Samples, samples_from_draws
from diverse.validate import check_choice, check_count

SUBSETS = ("last_layer", "all")
HESSIANS = ("diag", "kron")
PRIOR_STRUCTURES = ("scalar", "layerwise")
SAMPLE_STREAM = 7_004  # generator seed offset of the posterior draws


@dataclass(frozen=True)
class LaplaceConfig:
    """``[method] name = "laplace"``.

    Fields:
        name: ``"laplace"``.
        subset_of_weights: ``"last_layer"`` (default) or ``"all"``.
        hessian_structure: ``"kron"`` (default) or ``"diag"``.
        prior_structure: τ tuned as one ``"scalar"`` (default) or per layer (``"layerwise"``).
        marglik_steps: gradient steps of the marginal-likelihood tuning, ≥ 1 (default 100).
        fit_subset: fit on the first n training examples, 0 = all (default 0).
        fit_batch_size: batch size of the curvature pass, ≥ 1 (default 256).
        predict_samples: posterior draws per member at prediction, ≥ 1 (default 10).
    """

    name: str = "laplace"
    subset_of_weights: str = "last_layer"
    hessian_structure: str = "kron"
    prior_structure: str = "scalar"
    marglik_steps: int = 100
    fit_subset: int = 0
    fit_batch_size: int = 256
    predict_samples: int = 10

    def __post_init__(self) -> None:
        check_choice("[method] subset_of_weights", self.subset_of_weights, SUBSETS)
        check_choice("[method] hessian_structure", self.hessian_structure, HESSIANS)
        check_choice("[method] prior_structure", self.prior_structure, PRIOR_STRUCTURES)
        check_count("[method] marglik_steps", self.marglik_steps)
        check_count("[method] fit_subset", self.fit_subset, 0)
        check_count("[method] fit_batch_size", self.fit_batch_size)
        check_count("[method] predict_samples", self.predict_samples)


def laplace_class() -> Callable[..., Any]:
    """``laplace.Laplace``, imported on first use (it pulls in curvlinops, BackPACK, ASDL).

    ASDL decorates functions with ``torch.jit.script`` at import, which torch 2.13
    reports as deprecated; that warning (theirs, not ours) is silenced for the import.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*",
                                category=DeprecationWarning)
        from laplace import Laplace
    return Laplace


def build_laplace(cfg: LaplaceConfig, data: TrainingData | None = None
                  ) -> Callable[[Step], StepResult]:
    """The training update: deep-ensemble MAP; refuses regression data."""
    if data is not None and data.task != "classification":
        raise UserError("[method] laplace needs classification data (laplace-torch's "
                        "classification likelihood)")
    return deep_ensemble(DeepEnsembleConfig())


def last_linear(module: nn.Module) -> str:
    """Name of the last ``nn.Linear`` of ``module`` in module order (the output layer)."""
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"laplace: model {type(module).__name__} has no Linear layer for "
                        f"subset_of_weights = 'last_layer'")
    return names[-1]


def fit_laplace(module: nn.Module, loader: DataLoader, cfg: LaplaceConfig,
                prior_precision: float) -> Any:
    """Fit laplace-torch on ``module`` at its weights (the MAP) and tune τ by marginal likelihood.

    Returns the fitted ``laplace`` object. ``loader`` yields ``(x, y)`` batches
    (laplace-torch moves them to the module's device); the module is put in
    eval mode.
    """
    extra = {"last_layer_name": last_linear(module)} if cfg.subset_of_weights == "last_layer" \
        else {}
    la = laplace_class()(module.eval(), "classification",
                         subset_of_weights=cfg.subset_of_weights,
                         hessian_structure=cfg.hessian_structure,
                         prior_precision=prior_precision, **extra)
    la.fit(loader)
    with warnings.catch_warnings():
        # laplace-torch always reminds that its GLM predictive defaults to probit; we
        # predict through weight samples, so the reminder does not apply.
        warnings.filterwarnings("ignore", message=r"By default `link_approx` is `probit`.*")
        la.optimize_prior_precision(method="marglik", pred_type="nn", link_approx="mc",
                                    n_steps=cfg.marglik_steps, init_prior_prec=prior_precision,
                                    prior_structure=cfg.prior_structure)
    return la


def random_names(module: nn.Module, subset_of_weights: str) -> list[str]:
    """Parameter names covered by laplace-torch's flat vector, in its order."""
    if subset_of_weights == "last_layer":
        layer = last_linear(module)
        return [f"{layer}.{n}" for n, _ in dict(module.named_modules())[layer].named_parameters()]
    return [n for n, p in module.named_parameters() if p.requires_grad]


def unflatten_draws(flat: Tensor, module: nn.Module, names: list[str]) -> list[Params]:
    """laplace-torch's ``(S, P)`` draws → per draw ``{name: (1, *shape)}`` of all parameters.

    The ``names`` take their values from ``flat`` (in order); the others stay at
    the module's (MAP) values.
    """
    shapes = dict(module.named_parameters())
    draws = []
    for row in flat:
        start, params = 0, {}
        for name in names:
            n = shapes[name].numel()
            params[name] = row[start:start + n].reshape(shapes[name].shape)
            start += n
        if start != row.numel():
            raise RuntimeError(f"laplace draw has {row.numel()} entries, {names} need {start}")
        draws.append({k: params.get(k, v.detach()).unsqueeze(0).clone()
                      for k, v in module.named_parameters()})
    return draws


def curvature_loader(cfg: LaplaceConfig, data: TrainingData | None,
                     device: torch.device) -> DataLoader:
    """The loader laplace-torch fits its curvature on: the user's own ``DataLoader``
    as given (``fit_subset = 0``), else the (first ``fit_subset``) training tensors."""
    if data is None:
        raise UserError("laplace needs the training data to fit its curvature (TrainingData)")
    if isinstance(data.batches, DataLoader) and cfg.fit_subset == 0:
        return data.batches
    if data.inputs is not None and data.targets is not None:
        x, y = data.inputs, data.targets
        if cfg.fit_subset > 0:
            x, y = x[:cfg.fit_subset], y[:cfg.fit_subset]
    else:
        x, y = data.full()
        if cfg.fit_subset > 0:
            x, y = x[:cfg.fit_subset], y[:cfg.fit_subset]
    return DataLoader(TensorDataset(x.to(device), y.to(device)), batch_size=cfg.fit_batch_size)


def finalize_laplace(cfg: LaplaceConfig, ensemble: Ensemble, finish: Finish) -> Samples:
    """Fit laplace-torch per member and draw ``predict_samples`` weights of each."""
    ens = ensemble
    loader = curvature_loader(cfg, finish.data, ens.device)
    sigma = finish.prior_std
    tau = 1.0 / sigma**2 if sigma > 0 else 1.0
    per_member = []
    for m in range(ens.members):
        module = ens.member(m)
        for name in ens.shared:  # an ensemble form's shared tensors are not random here
            if name in dict(module.named_parameters()):
                module.get_parameter(name).requires_grad_(False)
        la = fit_laplace(module, loader, cfg, tau)
        generator = torch.Generator(device=ens.device).manual_seed(
            member_seed(finish.seed, ens.member_offset + m) + SAMPLE_STREAM)
        with torch.no_grad():
            flat = la.sample(cfg.predict_samples, generator=generator)
        per_member.append(unflatten_draws(flat, module,
                                          random_names(module, cfg.subset_of_weights)))
    draws = [{k: torch.cat([per_member[m][d][k] for m in range(ens.members)])
              for k in per_member[0][d] if k not in ens.shared}
             for d in range(cfg.predict_samples)]
    return samples_from_draws(finish.skeleton, draws, ens.member_buffers)
