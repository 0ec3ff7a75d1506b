"""Feature-space diversity: HE-CKA ensembles, SVGD with the HE-CKA kernel, and
hypernetworks (Smerkous, Bai & Fuxin, NeurIPS 2024).

Smerkous, Bai & Fuxin, "Enhancing diversity in Bayesian deep learning via
hyperspherical energy minimization of CKA" (NeurIPS 2024). Members are compared
through the features of named layers on the batch: each member's centered Gram
matrix becomes a point on the unit sphere and the hyperspherical energy of those
points (:mod:`diverse.math.he_cka`) is pushed down, which pulls the members' CKA
apart. Three methods compose the same pieces:

* ``he-cka``: independent members plus the energy term,

      L = Σ_m NLL_m + M·[w_t γ Σ_l w_l HE_l(x) + β_ood·(−H(p̄(x̃))) + w_t γ_ood Σ_l w_l HE_l(x̃)],

  where x̃ is a batch of synthetic outliers (:mod:`diverse.data.outliers`, optional),
  p̄ the members' mean softmax on them and w_t the linear warm-up. The reference
  code averages the cross-entropy over members; we sum it (so γ = 0 is exactly
  the deep ensemble) and multiply the shared terms by M, which keeps the
  reference's γ, γ_ood and β_ood meaning the same thing.
* ``svgd-cka``: SVGD whose kernel between members is the layer-weighted energy
  matrix K_mn = Σ_l w_l E(θ_mn,l) (the reference's ``svgd`` with an ``he`` model
  kernel): φ_m = (1/M) Σ_n [a K_nm ∇log p(w_n|D)/N − γ ∇_{w_m} K_mn]. As in the
  reference (``detach_right``) the gradient of K_mn reaches member m only.
* ``hyper-he-cka``: a hypernetwork (:mod:`diverse.nets.hypernet`) generates K members
  per step from latent codes; the same loss is applied to the generated members
  and descends the hypernetwork's weights. After training it generates
  ``predict_members`` members from fixed codes.

The special layer name ``"output"`` means the network's output (logits); by
default the layers are the model's ``feature_layers`` followed by the output,
weighted by the reference's depth-increasing schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diverse.data.datasets import normalize
from diverse.data.outliers import OutlierConfig, synthetic_outliers
from diverse.errors import UserError
from diverse.math import he_cka as he
from diverse.math.cka import CENTERINGS, GRAM_KINDS, as_matrix, unit_grams
from diverse.methods.base import (
    Step,
    StepResult,
    TrainingData,
    interaction_logs,
    member_diagnostics,
    member_gradients,
)
from diverse.nets.ensemble import Params, flatten_params, unflatten_params
from diverse.nets.forms import resolve_layer
from diverse.nets.hypernet import HyperNetConfig, HyperNetwork, generate_with

OUTPUT = "output"


@dataclass(frozen=True)
class FeatureDiversityConfig:
    """The fields the HE-CKA family shares (abstract: :class:`HECKAConfig`,
    :class:`SVGDCKAConfig` and :class:`HyperHECKAConfig` are the configs).

    Defaults are the reference's LeNet / Dirty-MNIST settings
    (``configs/mnist/ens+ood/he-cossim.yml``).

    Fields:
        gamma: weight γ of the inlier energy term (default 0.25).
        kernel: feature Gram kernel ``"linear" | "cosine" | "rbf"`` (default cosine).
        centering: ``"standard"`` (H·K·H, default) or ``"one-sided"`` (K·H, the
            reference code).
        energy: ``"riesz"`` (default) or ``"exponential"``; ``s`` its exponent
            (default 2; 0 = log energy).
        eps: energy smoothing ε (default 0.0025); eps_arc: arccos smoothing ε_arc
            (default 0.065).
        layers: feature layers compared (module names, or ``"output"`` for the
            logits); empty (default) = the model's ``feature_layers`` + output.
        layer_weights: explicit per-layer weights; empty (default) = the
            ``layer_schedule`` (``"first-middle-last"`` default, or ``"uniform"``).
        warmup_steps: linear warm-up of the energy terms over this many steps (50).
        outliers: synthetic outliers per step (0 = none, default). They need an
            image data set; each step draws a fresh batch (deterministic under the
            run seed).
        gamma_ood: weight of the outlier energy term (default 1.25).
        beta_ood: weight of the outlier entropy term −H(mean softmax) (1.5).
        p_transformed: probability that an outlier is a transformed training
            image rather than a generated pattern (default 0.35).
        outlier_pool: training images kept as sources for transformed outliers (2048).
    """

    name: str = ""
    gamma: float = 0.25
    kernel: str = "cosine"
    centering: str = "standard"
    energy: str = "riesz"
    s: float = 2.0
    eps: float = 0.0025
    eps_arc: float = 0.065
    layers: tuple[str, ...] = ()
    layer_weights: tuple[float, ...] = ()
    layer_schedule: str = "first-middle-last"
    warmup_steps: int = 50
    outliers: int = 0
    gamma_ood: float = 1.25
    beta_ood: float = 1.5
    p_transformed: float = 0.35
    outlier_pool: int = 2048

    def __post_init__(self) -> None:
        _choice("kernel", self.kernel, tuple(GRAM_KINDS))
        _choice("centering", self.centering, tuple(CENTERINGS))
        _choice("energy", self.energy, tuple(he.ENERGIES))
        _choice("layer_schedule", self.layer_schedule, he.LAYER_SCHEDULES)
        for key in ("gamma", "gamma_ood", "beta_ood", "s", "eps", "eps_arc", "warmup_steps",
                    "outliers"):
            if getattr(self, key) < 0:
                raise UserError(f"[method] {key} = {getattr(self, key)}: must be >= 0")
        if not 0.0 <= self.p_transformed <= 1.0:
            raise UserError(f"[method] p_transformed = {self.p_transformed}: must be in [0, 1]")
        if self.outlier_pool < 1:
            raise UserError(f"[method] outlier_pool = {self.outlier_pool}: must be >= 1")


@dataclass(frozen=True)
class HECKAConfig(FeatureDiversityConfig):
    """``[method] name = "he-cka"``: an ensemble with HE-CKA feature repulsion (the
    :class:`FeatureDiversityConfig` fields)."""

    name: str = "he-cka"


@dataclass(frozen=True)
class HyperHECKAConfig(FeatureDiversityConfig):
    """``[method] name = "hyper-he-cka"``: the HE-CKA fields plus the hypernetwork's.

    ``[ensemble] members`` is the number of networks generated per training step.

    Fields (see :class:`diverse.nets.hypernet.HyperNetConfig`):
        z_dim: latent dimension (32); hidden: trunk width (128); code_dim:
            per-layer code dimension (32, >= 2).
        predict_members: networks generated for prediction (10); ``diverse
            evaluate RUN --predict-members K`` re-evaluates with another K.
        spread: s in (0, 1], the share of the init that differs between
            generated networks (0.1).
        code_lr: step size of the member-specific part of the generated
            weights relative to the mean network's, under Adam (1.0).
        weight_norm: weight-normalized generated weights, code → row
            directions, shared gains → row norms (false).
    """

    name: str = "hyper-he-cka"
    z_dim: int = 32
    hidden: int = 128
    code_dim: int = 32
    predict_members: int = 10
    spread: float = 0.1
    code_lr: float = 1.0
    weight_norm: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        # the hypernetwork's own rules, checked when the config is read
        HyperNetConfig(z_dim=self.z_dim, hidden=self.hidden, code_dim=self.code_dim,
                       predict_members=self.predict_members, spread=self.spread,
                       code_lr=self.code_lr, weight_norm=self.weight_norm)


@dataclass(frozen=True)
class SVGDCKAConfig(FeatureDiversityConfig):
    """``[method] name = "svgd-cka"``: the HE-CKA fields (no outliers) plus

    Fields:
        driving_scale: a, the weight of the kernel-smoothed driving term (1).
        gamma: the repulsion weight γ (default 1).
        eps, eps_arc: defaults 5e-5 and 0.165 (the reference's SVGD config).
    """

    name: str = "svgd-cka"
    gamma: float = 1.0
    eps: float = 5e-5
    eps_arc: float = 0.165
    driving_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outliers:
            raise UserError(f"[method] outliers = {self.outliers}: svgd-cka has no outlier "
                            "term (as in the reference); use he-cka")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"[method] {key} = {value!r}: allowed {', '.join(allowed)}")


# ------------------------------------------------------------------ the pieces
def resolve_layers(cfg: FeatureDiversityConfig, module: nn.Module
                   ) -> tuple[tuple[str, ...], list[float]]:
    """The compared layers and their weights (validated against the model)."""
    names = dict(module.named_modules())
    if not cfg.layers and not getattr(module, "feature_layers", ()):
        raise UserError(f"[method] layers: model {type(module).__name__} declares no "
                        "feature_layers, so HE-CKA would compare the outputs only; name the "
                        "layers to compare, e.g. layers = [\"<module>\", \"output\"], from: "
                        f"{', '.join(n for n in names if n)}")
    layers = tuple(resolve_layer(module, n) for n in (tuple(cfg.layers)
                                                      or (*module.feature_layers, OUTPUT)))
    for layer in layers:
        if layer != OUTPUT and layer not in names:
            raise UserError(f"[method] layers: {layer!r} is not a module of the model; allowed: "
                            f"{OUTPUT!r} or one of {', '.join(n for n in names if n)}")
    schedule: str | Sequence[float] = cfg.layer_weights or cfg.layer_schedule
    return layers, he.layer_weights(len(layers), schedule)


def layer_resolver(cfg: FeatureDiversityConfig
                   ) -> Callable[[nn.Module], tuple[tuple[str, ...], list[float]]]:
    """:func:`resolve_layers` on the first call, remembered afterwards."""
    memo: list[tuple[tuple[str, ...], list[float]]] = []

    def layers_of(module: nn.Module) -> tuple[tuple[str, ...], list[float]]:
        if not memo:
            memo.append(resolve_layers(cfg, module))
        return memo[0]

    return layers_of


def energy_options(cfg: FeatureDiversityConfig) -> dict[str, Any]:
    return {"kernel": cfg.kernel, "centering": cfg.centering, "s": cfg.s,
            "energy": cfg.energy, "eps": cfg.eps, "eps_arc": cfg.eps_arc}


def split_features(out: Tensor, feats: dict[str, Tensor], layers: Sequence[str],
                   start: int, stop: int) -> dict[str, Tensor]:
    """``{layer: (M, stop − start, ...)}`` for a slice of the batch axis."""
    return {layer: (out if layer == OUTPUT else feats[layer])[:, start:stop] for layer in layers}


def mean_softmax_entropy(logits: Tensor) -> Tensor:
    """Mean over examples of H(mean_m softmax(f_m(x))); logits ``(M, B, C)`` → scalar."""
    p = logits.softmax(-1).mean(0)
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()


def energy_matrix(features: dict[str, Tensor], weights: Sequence[float],
                  cfg: FeatureDiversityConfig) -> Tensor:
    """K_mn = Σ_l w_l E(θ_mn,l), ``(M, M)``, with θ_mn's gradient reaching m only.

    ``⟨k̂_m, k̂_n⟩`` is computed as ``k̂_m · stop_grad(k̂_n)`` (the reference's
    ``detach_right``), so ``∂/∂w_m Σ_n K_mn`` is member m's own SVGD repulsion.
    """
    total: Tensor | None = None
    for w, f in zip(weights, features.values(), strict=True):
        if w == 0:
            continue
        unit = unit_grams(as_matrix(f, leading=1), cfg.kernel, cfg.centering)
        cos = unit @ unit.detach().mT
        theta = torch.arccos((cos / (1.0 + cfg.eps_arc)).clamp(-1.0, 1.0))
        k = float(w) * he.ENERGIES[cfg.energy](theta, s=cfg.s, eps=cfg.eps)
        total = k if total is None else total + k
    if total is None:
        raise UserError("[method] layer weights are all 0: nothing to compare")
    return total


class OutlierSource:
    """Synthetic outliers for a step, normalized like the training inputs.

    Each call draws the generator seed from the global RNG, which the training
    loop reseeds every epoch, so a resumed run sees the same outliers.
    """

    def __init__(self, cfg: FeatureDiversityConfig, data: TrainingData | None) -> None:
        if data is None:
            raise UserError(f"[method] outliers = {cfg.outliers}: synthetic outliers are drawn "
                            "from training images; give the training data (TrainingData)")
        x = data.head(cfg.outlier_pool)
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"[method] outliers = {cfg.outliers}: synthetic outliers need image "
                            f"data (N, 1|3, H, W); {data.name} has inputs "
                            f"{tuple(x.shape[1:])}")
        from diverse.data.datasets import denormalize

        self.pool = denormalize(x, data.mean, data.std).clamp(0, 1)
        self.mean, self.std = data.mean, data.std
        self.count = cfg.outliers
        self.options = OutlierConfig(p_transformed=cfg.p_transformed)

    def __call__(self, device: torch.device) -> Tensor:
        seed = int(torch.randint(0, 2**62, ()))
        gen = torch.Generator().manual_seed(seed)
        raw = synthetic_outliers(self.pool, self.count, gen, self.options)
        return normalize(raw, self.mean, self.std).to(device)


def diversity_loss(cfg: FeatureDiversityConfig, step: Step, out: Tensor, feats: dict[str, Tensor],
                   layers: Sequence[str], weights: Sequence[float],
                   n_in: int) -> tuple[Tensor, dict[str, float]]:
    """w_t γ HE(inliers) [+ β_ood (−H) + w_t γ_ood HE(outliers)], a scalar, and logs."""
    wt = he.warmup(step.index, cfg.warmup_steps)
    opts = energy_options(cfg)
    he_in = he.he_cka_layers(split_features(out, feats, layers, 0, n_in), weights, **opts)
    total = wt * cfg.gamma * he_in
    logs: dict[str, Tensor | float] = {"he_cka": he_in.detach(), "warmup": wt}
    if out.shape[1] > n_in:
        stop = out.shape[1]
        he_ood = he.he_cka_layers(split_features(out, feats, layers, n_in, stop), weights, **opts)
        entropy = mean_softmax_entropy(out[:, n_in:])
        total = total + cfg.beta_ood * (-entropy) + wt * cfg.gamma_ood * he_ood
        logs.update(he_cka_ood=he_ood.detach(), outlier_entropy=entropy.detach())
    return total, logs


def _features(step: Step, params: Params, x: Tensor,
              layers: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    modules = [layer for layer in layers if layer != OUTPUT]
    return step.ensemble.features(x, modules, params=params)


# ------------------------------------------------------------------ the methods
def build_he_cka(cfg: FeatureDiversityConfig, data: TrainingData | None = None
                 ) -> Callable[[Step], StepResult]:
    """HE-CKA ensemble (with synthetic outliers when ``outliers > 0``)."""
    source = OutlierSource(cfg, data) if cfg.outliers else None
    layers_of = layer_resolver(cfg)

    def update(step: Step) -> StepResult:
        ens, params = step.ensemble, step.ensemble.params
        layers, weights = layers_of(ens.module)
        n_in = len(step.x)
        x = step.x if source is None else torch.cat([step.x, source(step.x.device)])
        out, feats = _features(step, params, x, layers)
        loss = step.target.loss(out[:, :n_in], step.y, params)
        diversity, logs = diversity_loss(cfg, step, out, feats, layers, weights, n_in)
        grads = member_gradients(loss.sum() + ens.members * diversity, params)
        logs.update(member_diagnostics(out[:, :n_in]))
        return StepResult(loss=loss.detach(), outputs=out[:, :n_in].detach(), grads=grads,
                          logs=logs)

    return update


def build_svgd_cka(cfg: SVGDCKAConfig, data: TrainingData | None = None
                   ) -> Callable[[Step], StepResult]:
    """SVGD with the layer-weighted HE-CKA energy as the kernel between members."""
    layers_of = layer_resolver(cfg)

    def update(step: Step) -> StepResult:
        ens, params = step.ensemble, step.ensemble.params
        layers, weights = layers_of(ens.module)
        out, feats = _features(step, params, step.x, layers)
        loss = step.target.loss(out, step.y, params)
        drive = -flatten_params(member_gradients(loss.sum(), params, retain_graph=True))
        k = energy_matrix(split_features(out, feats, layers, 0, len(step.x)), weights, cfg)
        rep = flatten_params(member_gradients(k.sum(), params))
        m = ens.members
        a = cfg.driving_scale * he.warmup(step.index, 0)
        wt = he.warmup(step.index, cfg.warmup_steps)
        driving = (a / m) * (k.detach().mT @ drive)
        repulsion = (wt * cfg.gamma / m) * rep
        phi = driving - repulsion
        off = ~torch.eye(m, dtype=torch.bool, device=k.device)
        logs = {"kernel_mean": k.detach()[off].mean() if m > 1 else 0.0,
                **interaction_logs(driving.norm(dim=-1), repulsion.norm(dim=-1)),
                **member_diagnostics(out)}
        return StepResult(loss=loss.detach(), outputs=out.detach(),
                          grads=unflatten_params(-phi, params), logs=logs)

    return update


# ------------------------------------------------------------------ hypernetwork
def hyper_config(cfg: HyperHECKAConfig, members: int, seed: int) -> HyperNetConfig:
    """The hypernetwork settings of a method config (``members`` generated per step)."""
    return HyperNetConfig(z_dim=cfg.z_dim, hidden=cfg.hidden, code_dim=cfg.code_dim,
                          train_members=members, predict_members=cfg.predict_members,
                          seed=seed, spread=cfg.spread, code_lr=cfg.code_lr,
                          weight_norm=cfg.weight_norm)


def wrap_hypernetwork(cfg: HyperHECKAConfig, target: nn.Module, members: int,
                      seed: int) -> nn.Module:
    """``wrap_model`` hook: the target network → its hypernetwork."""
    return HyperNetwork(target, hyper_config(cfg, members, seed))


def build_hyper_he_cka(cfg: FeatureDiversityConfig, data: TrainingData | None = None
                       ) -> Callable[[Step], StepResult]:
    """Hypernetwork trained with the HE-CKA loss on the members it generates.

    The run's ensemble holds one slot, the hypernetwork; each step draws K codes
    z ~ N(0, I) (K = ``[ensemble] members``), generates K target networks and
    applies :func:`build_he_cka`'s loss to them. The prior penalty
    (``[train] prior_std``) applies to the generated weights.
    """
    source = OutlierSource(cfg, data) if cfg.outliers else None
    layers_of = layer_resolver(cfg)

    def update(step: Step) -> StepResult:
        ens = step.ensemble
        hyper: HyperNetwork = ens.module  # type: ignore[assignment]
        own = {k: v[0] for k, v in ens.params.items()}
        layers, weights = layers_of(hyper.target)
        k = hyper.cfg.train_members
        first = next(iter(own.values()))  # codes in the parameters' dtype (float64 works too)
        z = torch.randn(k, hyper.cfg.z_dim, device=first.device, dtype=first.dtype)
        n_in = len(step.x)
        x = step.x if source is None else torch.cat([step.x, source(step.x.device)])
        modules = [layer for layer in layers if layer != OUTPUT]
        generated = generate_with(hyper, own, z)
        out, feats = hyper.apply_features(generated, x, modules)
        loss = step.target.loss(out[:, :n_in], step.y, generated)
        diversity, logs = diversity_loss(cfg, step, out, feats, layers, weights, n_in)
        grads = member_gradients(loss.sum() + k * diversity, ens.params)
        logs.update(member_diagnostics(out[:, :n_in]))
        return StepResult(loss=loss.detach(), outputs=out[:, :n_in].detach(), grads=grads,
                          logs=logs)

    return update
