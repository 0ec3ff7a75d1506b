"""Mutual learning of Bayesian neural networks with model and feature diversity.

Pham, Nguyen, Le, Phung, Carneiro & Do, "Model and Feature Diversity for
Bayesian Neural Networks in Mutual Learning" (NeurIPS 2023). K ≥ 2 peers (the
ensemble's M members) are mean-field
Gaussian BNNs (:mod:`diverse.nets.bayes`). Peer k minimizes, per example,

    L_k = NLL_k + λ_KL·KL(q_k ‖ p)/N
          + γ·T²·mean_{j≠k} KL(softmax(f_j/T)‖softmax(f_k/T))          (mutual learning)
          − s(t)·[ α·mean_{j≠k} log(1 + W2²(q_k, q_j)/D) + β·D_feat,k ]   (diversity)

with the other peer always detached (stop-gradient), so the sum over peers
has every peer's own gradient. NLL_k is the minibatch mean of one
local-reparameterization sample; s(t) = 1 once the training progress t
reaches ``diversity_start`` and 0 before (the paper's two stages: mutual
learning, then diversity added).

Departures from / choices where the paper is silent:

* Parameter diversity. W2² between diagonal Gaussians is
  ‖μ_k − μ_j‖² + ‖σ_k − σ_j‖² (:func:`diverse.nets.bayes.pairwise_w2_squared`,
  unmodified). Maximizing it raw is unbounded: its gradient 2(μ_k − μ_j) grows
  with the distance, so the peers separate exponentially, and its scale (sum
  over all D weights, ~10³ for a small MLP at initialization) dwarfs the
  per-example NLL. We maximize ``log(1 + W2²/D)`` instead: W2²/D is the mean
  squared distance per weight coordinate (dimension-free, the same meaning
  for an MLP and a ResNet) and the logarithm makes the push saturate, its
  gradient decaying like 1/W2² once the peers are apart, so the likelihood
  and the ELBO's KL keep the posteriors anchored.
* Feature fusion (:class:`CrossAttentionFusion`). Each feature layer's output
  is averaged over its spatial axes (or flattened), giving one vector per
  layer, projected by its own linear map to a token t_l ∈ R^d
  (d = ``attention_dim``). The last feature layer's token is the query and all
  tokens are keys/values: single-head scaled dot-product cross-attention
  z = Σ_l softmax_l(⟨W_q t_L, W_k t_l⟩/√d) W_v t_l.
* Feature distribution. As in probabilistic knowledge transfer (Passalis &
  Tefas 2018, the paper's Eq. 14 kernel), the fused features of a batch define
  conditional probabilities p(a|b) ∝ K(z_a, z_b) + ε over a ≠ b with the
  cosine kernel K(u, v) = ½(uᵀv/(‖u‖‖v‖) + 1) and ε = 1e-6 (which also bounds
  the divergence). D_feat,k = mean_{j≠k} mean_b KL(p_k(·|b) ‖ sg p_j(·|b)).
  A batch of one example has no such distribution: D_feat = 0 there.
* The fusion head is part of each peer (its parameters are stacked with the
  member's); its only training signal is the feature-diversity term, so it is
  untouched before ``diversity_start``.
* The step's Gaussian ``prior_std`` penalty is not applied: the ELBO's KL to
  N(0, ``prior_std``² I) on the mean-field weights replaces it; the
  deterministic parameters (norm layers, fusion head) get no prior.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from diverse.errors import UserError
from diverse.methods.base import Step, StepResult, TrainingData, member_gradients
from diverse.nets.bayes import mean_field_count, mean_field_kl, pairwise_w2_squared, to_mean_field
from diverse.nets.ensemble import Ensemble, Params

HEAD = "mutual_head"
"""Name of the fusion-head submodule that :func:`wrap_mutual_peer` adds to a peer."""

FEATURE_EPS = 1e-6
"""ε added to the cosine kernel before normalizing it into p(a|b)."""


@dataclass(frozen=True)
class MutualBNNConfig:
    """``[method] name = "mutual-bnn"``.

    Fields:
        name: ``"mutual-bnn"``.
        temperature: distillation temperature T > 0 of the mutual-learning
            term (default 3.0).
        mutual_weight: γ ≥ 0, weight of T²·KL(peers ‖ own) (default 1.0).
        alpha: α ≥ 0, parameter-diversity weight (default 1.0, the paper).
        beta: β ≥ 0, feature-diversity weight (default 2.0, the paper).
        diversity_start: training progress in [0, 1] at which the diversity
            terms switch on (default 0.5; 1 never switches them on).
        prior_std: σ_p > 0 of the N(0, σ_p² I) weight prior (default 1.0).
        init_rho: initial ρ of every mean-field weight, σ = softplus(ρ)
            (default −5.0, σ ≈ 6.7e-3).
        kl_weight: λ_KL ≥ 0, scale of the ELBO's KL/N (default 1.0).
        feature_layers: modules whose outputs are fused; ``()`` (default) uses
            the model's ``feature_layers``.
        attention_dim: d ≥ 1, token width of the fusion head (default 64).
        predict_samples: Monte Carlo draws per peer at prediction, ≥ 1
            (default 8; read by the training code).
    """

    name: str = "mutual-bnn"
    temperature: float = 3.0
    mutual_weight: float = 1.0
    alpha: float = 1.0
    beta: float = 2.0
    diversity_start: float = 0.5
    prior_std: float = 1.0
    init_rho: float = -5.0
    kl_weight: float = 1.0
    feature_layers: tuple[str, ...] = ()
    attention_dim: int = 64
    predict_samples: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.feature_layers, list):  # TOML arrays arrive as lists
            object.__setattr__(self, "feature_layers", tuple(self.feature_layers))
        _check("temperature", self.temperature, lambda v: v > 0, "a number > 0")
        for key in ("mutual_weight", "alpha", "beta", "kl_weight"):
            _check(key, getattr(self, key), lambda v: v >= 0, "a number >= 0")
        _check("diversity_start", self.diversity_start, lambda v: 0.0 <= v <= 1.0,
               "a number in [0, 1]")
        _check("prior_std", self.prior_std, lambda v: v > 0, "a number > 0")
        _check("init_rho", self.init_rho, lambda v: True, "a finite number")
        for key in ("attention_dim", "predict_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"[method] {key} = {value!r}: must be an integer >= 1")
        if not all(isinstance(n, str) and n for n in self.feature_layers):
            raise UserError(
                f"[method] feature_layers = {self.feature_layers!r}: must be module names"
            )


def _check(key: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
    """UserError unless ``value`` is a finite real number (not a bool) with ``ok(value)``."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not ok(value):
        raise UserError(f"[method] {key} = {value!r}: must be {allowed}")


# ----------------------------------------------------------------- fusion head


def pool_feature(h: Tensor) -> Tensor:
    """``(B, C, *spatial)`` → ``(B, C)`` by the spatial mean; ``(B, P)`` unchanged."""
    return h.mean(dim=tuple(range(2, h.dim()))) if h.dim() > 2 else h


class CrossAttentionFusion(nn.Module):
    """Fuses several layers' features of one peer by cross-attention.

    Shapes: ``forward(h_1, ..., h_L)`` with ``h_l: (B, C_l, ...)`` → ``(B, d)``.
    ``t_l = proj_l(pool(h_l))``; ``q = W_q t_L``; ``k_l = W_k t_l``;
    ``v_l = W_v t_l``; ``z = Σ_l softmax_l(q·k_l/√d) v_l``.

    Submodules: ``proj`` (``nn.ModuleList`` of ``Linear(C_l, d)``), ``query``,
    ``key``, ``value`` (``Linear(d, d)``). Attribute ``layers``: the fused
    module names, in order.
    """

    def __init__(self, layers: Sequence[str], widths: Sequence[int], dim: int) -> None:
        super().__init__()
        self.layers = tuple(layers)
        self.widths = tuple(widths)
        self.dim = dim
        self.proj = nn.ModuleList(nn.Linear(c, dim) for c in widths)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, *features: Tensor) -> Tensor:
        tokens = []
        for name, width, proj, h in zip(self.layers, self.widths, self.proj, features,
                                        strict=True):
            pooled = pool_feature(h)
            if pooled.shape[-1] != width:
                raise UserError(
                    f"mutual-bnn feature layer {name!r} gives {pooled.shape[-1]} channels, "
                    f"the fusion head was built for {width}: choose feature_layers whose "
                    f"width follows from the last Linear/Conv2d before them"
                )
            tokens.append(proj(pooled))
        t = torch.stack(tokens, dim=1)  # (B, L, d)
        q = self.query(t[:, -1:])  # (B, 1, d)
        scores = (q @ self.key(t).mT) / math.sqrt(self.dim)  # (B, 1, L)
        return (scores.softmax(-1) @ self.value(t)).squeeze(1)  # (B, d)


def _layer_width(module: nn.Module, layer: str) -> int:
    """Channels of ``layer``'s output: those of the last Linear/Conv2d registered
    at or before the end of ``layer``'s subtree (registration order is execution
    order in :mod:`diverse.nets.models`; pooling, norms and activations keep widths)."""
    names = [n for n, _ in module.named_modules()]
    mods = dict(module.named_modules())
    last = max(i for i, n in enumerate(names) if n == layer or n.startswith(layer + "."))
    for n in reversed(names[: last + 1]):
        m = mods[n]
        if hasattr(m, "out_features"):
            return int(m.out_features)
        if hasattr(m, "out_channels"):
            return int(m.out_channels)
    raise UserError(f"mutual-bnn feature layer {layer!r}: no Linear/Conv2d before it sets a width")


class SequentialPeer(nn.Module):
    """A ``nn.Sequential``'s layers under the same names, run in the same order.

    Adding the fusion head to a ``Sequential`` (e.g. :class:`diverse.nets.models.MLP`)
    would make it a step of the forward pass; this container runs only
    ``layer_names`` and copies the public attributes (``feature_layers``).
    """

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        for name, child in seq.named_children():
            self.add_module(name, child)
        self.layer_names = tuple(name for name, _ in seq.named_children())
        for key, value in vars(seq).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)

    def forward(self, x: Tensor) -> Tensor:
        for name in self.layer_names:
            x = self._modules[name](x)
        return x


def wrap_mutual_peer(cfg: MutualBNNConfig, module: nn.Module) -> nn.Module:
    """One peer: ``module`` made mean-field, plus the fusion head as ``mutual_head``.

    Applies :func:`diverse.nets.bayes.to_mean_field` (``cfg.prior_std``,
    ``cfg.init_rho``) and adds a :class:`CrossAttentionFusion` over
    ``cfg.feature_layers`` (default: the model's ``feature_layers``). The
    head's parameters are ordinary parameters of the peer, stacked per member;
    the peer's forward is unchanged (a ``nn.Sequential`` becomes a
    :class:`SequentialPeer` with the same module names). Call it inside the member factory (the
    head's initialization draws from the member's seed).
    """
    layers = cfg.feature_layers or tuple(getattr(module, "feature_layers", ()))
    if not layers:
        raise UserError(
            f"mutual-bnn: model {type(module).__name__} declares no feature_layers; "
            f"set [method] feature_layers"
        )
    peer = to_mean_field(module, prior_std=cfg.prior_std, init_rho=cfg.init_rho)
    if isinstance(peer, nn.Sequential):
        peer = SequentialPeer(peer)
    named = dict(peer.named_modules())
    unknown = [n for n in layers if n not in named or not n]
    if unknown:
        raise UserError(
            f"[method] feature_layers: {unknown[0]!r} is not a module of the model; "
            f"allowed: {', '.join(n for n in named if n)}"
        )
    widths = [_layer_width(peer, n) for n in layers]
    peer.add_module(HEAD, CrossAttentionFusion(layers, widths, cfg.attention_dim))
    return peer


def fusion_head(ensemble: Ensemble) -> CrossAttentionFusion:
    """The peers' fusion head (raises UserError for an unwrapped model)."""
    head = getattr(ensemble.module, HEAD, None)
    if not isinstance(head, CrossAttentionFusion):
        raise UserError(
            "mutual-bnn: the members were not built with wrap_mutual_peer "
            "(no fusion head 'mutual_head')"
        )
    return head


def fuse_features(ensemble: Ensemble, params: Mapping[str, Tensor],
                  features: Mapping[str, Tensor]) -> Tensor:
    """Each peer's fused feature ``(M, B, d)`` from its features ``{layer: (M, B, ...)}``.

    The head runs with every member's own (stacked) head parameters, under
    vmap or a loop following the ensemble's execution.
    """
    head = fusion_head(ensemble)
    prefix = HEAD + "."
    hp = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
    feats = tuple(features[n] for n in head.layers)

    def one(p: Params, *fs: Tensor) -> Tensor:
        return functional_call(head, p, fs, strict=True)

    if ensemble.resolved_execution() == "vmap":
        return vmap(one)(hp, *feats)
    return torch.stack([one({k: v[m] for k, v in hp.items()}, *(f[m] for f in feats))
                        for m in range(feats[0].shape[0])])


# ------------------------------------------------------------ pure loss terms


def off_diagonal_mean(matrix: Tensor) -> Tensor:
    """Row means over ``j ≠ k`` of an ``(M, M)`` matrix → ``(M,)``."""
    m = matrix.shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=matrix.device)
    return matrix.masked_fill(eye, 0.0).sum(1) / max(m - 1, 1)


def mutual_kl(logits: Tensor, temperature: float) -> Tensor:
    """``KL[j, k] = mean_b KL(sg softmax(f_j/T) ‖ softmax(f_k/T))``, ``(M, M)``.

    ``logits``: ``(M, B, C)``. Gradients reach the second argument (column k) only.
    """
    logq = F.log_softmax(logits / temperature, dim=-1)  # (M, B, C)
    logp = logq.detach()
    p = logp.exp()
    # Σ_c p_j (log p_j − log q_k), averaged over the batch
    cross = torch.einsum("jbc,kbc->jk", p, logq) / logits.shape[1]
    entropy_term = (p * logp).sum(-1).mean(1)  # (M,)
    return entropy_term.unsqueeze(1) - cross


def cosine_conditional_log_probs(z: Tensor, eps: float = FEATURE_EPS) -> Tensor:
    """``log p(a|b)`` for fused features ``z: (M, B, d)`` → ``(M, B, B)`` ``[m, b, a]``.

    p(a|b) = (K(z_a, z_b) + ε) / Σ_{c≠b} (K(z_c, z_b) + ε), K(u, v) = ½(cos(u, v) + 1)
    (Passalis & Tefas 2018). The diagonal a = b is not a probability (it is
    excluded from the normalization) and must be masked by the caller.
    """
    u = F.normalize(z, dim=-1, eps=1e-12)
    k = 0.5 * (u @ u.mT + 1.0) + eps  # (M, B, B)
    eye = torch.eye(z.shape[1], dtype=torch.bool, device=z.device)
    norm = k.masked_fill(eye, 0.0).sum(-1, keepdim=True)
    return k.log() - norm.log()


def feature_kl(z: Tensor) -> Tensor:
    """``D[k, j] = mean_b KL(p_k(·|b) ‖ sg p_j(·|b))`` for ``z: (M, B, d)``, ``(M, M)``.

    Gradients reach the first argument (row k) only. Zero for ``B < 2``.
    """
    m, b = z.shape[0], z.shape[1]
    if b < 2:
        return z.new_zeros(m, m) + 0.0 * z.sum()
    logp = cosine_conditional_log_probs(z)  # (M, B, B)
    logq = logp.detach()
    off = ~torch.eye(b, dtype=torch.bool, device=z.device)
    p = logp.exp() * off
    # Σ_{a≠b} p_k (log p_k − log q_j), averaged over b
    self_term = (p * logp.masked_fill(~off, 0.0)).sum(-1).mean(-1)  # (M,)
    cross = torch.einsum("kba,jba->kj", p, logq.masked_fill(~off, 0.0)) / b
    return self_term.unsqueeze(1) - cross


def parameter_diversity(params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(log(1 + W2²(q_k, sg q_j)/D), W2²)``, both ``(M, M)``; D = mean-field weight count."""
    detached = {k: v.detach() for k, v in params.items()}
    w2 = pairwise_w2_squared(params, detached)
    return torch.log1p(w2 / mean_field_count(params)), w2


# ------------------------------------------------------------------ the update


def build_mutual_bnn(cfg: MutualBNNConfig, data: TrainingData | None = None
                     ) -> Callable[[Step], StepResult]:
    """The mutual-learning-of-BNNs update (see the module docstring for L_k).

    The members must have been built through :func:`wrap_mutual_peer`.
    Returns ``update(step)``: ``loss`` = L_k ``(K,)``, ``outputs`` = the peers'
    sampled logits ``(K, B, C)``, ``grads`` = ∂Σ_k L_k/∂θ (each peer's own
    gradient), logs ``nll``, ``kl`` (KL/N), ``mutual``, ``w2`` (raw W2² between
    peers), ``param_div``, ``feature_div``, ``diversity_scale`` (s(t)).
    """
    if data is not None and data.task != "classification":
        raise UserError("[method] mutual-bnn needs classification data (mutual learning on logits)")
    t = cfg.temperature

    def update(step: Step) -> StepResult:
        ens, params = step.ensemble, step.ensemble.params
        if ens.members < 2:
            raise UserError(f"mutual-bnn: ensemble members = {ens.members}: needs >= 2 peers")
        head = fusion_head(ens)
        outputs, feats = ens.features(step.x, head.layers, params=params)
        nll = step.likelihood.nll(outputs, step.y).mean(1)  # (K,)
        kl = mean_field_kl(params, cfg.prior_std) / step.n_train
        mutual = t * t * off_diagonal_mean(mutual_kl(outputs, t).T)  # row k: peers j → k
        param_div, w2 = parameter_diversity(params)
        feat_div = feature_kl(fuse_features(ens, params, feats))
        d_param, d_feat = off_diagonal_mean(param_div), off_diagonal_mean(feat_div)
        s = 1.0 if step.progress >= cfg.diversity_start else 0.0
        loss = (nll + cfg.kl_weight * kl + cfg.mutual_weight * mutual
                - s * (cfg.alpha * d_param + cfg.beta * d_feat))
        grads = member_gradients(loss.sum(), params)
        logs = {key: v.detach().mean() for key, v in (
            ("nll", nll), ("kl", kl), ("mutual", mutual), ("w2", off_diagonal_mean(w2)),
            ("param_div", d_param), ("feature_div", d_feat))}
        logs["diversity_scale"] = s
        return StepResult(
            loss=loss.detach(),
            outputs=outputs.detach(),
            grads=grads,
            logs=logs,
        )

    return update
