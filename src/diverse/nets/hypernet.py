"""A hypernetwork: latent codes → the stacked parameters of sampled networks.

A hypernetwork (Ha et al. 2017; Krueger et al. 2017; Ratzlaff & Fuxin 2019)
is a parametrization of an implicit ensemble: K latent codes z_k ~ N(0, I) are
mapped by one shared network to K sets of parameters of a *target* network,
stacked like :class:`diverse.nets.ensemble.Ensemble` parameters
``{name: (K, *shape)}``, and the K target networks run vectorized
(``functional_call`` under ``vmap``; the member axis is never folded into the
batch). HE-CKA (Smerkous et al. 2024, arXiv:2411.00259) samples several networks per
step and repels their features.

Architecture. The target's parameter tensors are grouped into *layers* (the
module owning them: ``conv1.weight`` and ``conv1.bias`` form layer ``conv1``);
L layers, tensor t of layer l(t)::

    h   = trunk(z)                               z: (K, z_dim), tanh MLP
    c_l = LayerNorm(W_l h + a_l)                 (K, L, code_dim), no affine
    θ_t = G_t c_l + b_t                          plain generator, (K, *shape_t)
    θ_t[chunk j] = B_t (A_tj c_l) + b_t[chunk j] chunked generator (numel > chunk)

LayerNorm makes every code have ``‖c_l‖² = code_dim`` exactly, so the scale of
the generated weights is set by the generators alone. The trunk uses tanh (odd,
zero biases at init) rather than ReLU: a ReLU trunk maps independent latents
to codes with a shared positive component (cosine ≈ 0.5 between members at
init), tanh to codes that are uncorrelated on average, so the initial members
resemble independent draws of the target's init. The chunked generator is
a factorized linear map for big tensors: the flattened tensor is cut into
pieces of ``chunk`` elements, chunk j gets its own code ``A_tj c_l`` (A_tj:
code_dim × code_dim) and all chunks share one output basis B_t (chunk ×
code_dim); it costs ``numel + chunk·code_dim + n_chunks·code_dim²`` parameters
instead of ``numel·(code_dim + 1)`` (a 512×512×3×3 convolution: 2.4M + 2.1M +
37k instead of 80M). In both forms the offset b_t is a free full-size tensor
(the "mean network") and the member-to-member variation is linear in the code.

Initialization (a moment-matching form of the hyperfan init of Chang et al.
2020), read off the target's own initial tensors: a tensor the target
initializes to a constant (biases, GroupNorm scales, zero-initialized residual
branches) gets b_t = that constant and G_t = 0, so it is generated exactly as
the target has it and still receives gradients; a randomly initialized tensor
(assumed centred, as Kaiming, Xavier and PyTorch's default are) gets b_t = 0
and G_t ~ N(0, σ_t²/code_dim) with σ_t the root mean square of the target's
tensor, so every generated element has variance σ_t² — the scale of the
target's default (Kaiming) init. For chunks, A_tj ~ N(0, 1/code_dim) and B_t ~
N(0, σ_t²/code_dim) give the same variance in expectation; a constant chunked
tensor (σ_t = 0) receives no gradient on A_t until B_t has moved away from 0
(from the second step on).

Supported targets: networks without running statistics (MLP, LeNet-5,
ResNets with ``norm="group"`` or ``"none"``); BatchNorm targets raise
:class:`UserError`, because generated members would share one set of running
statistics that belongs to no member.

Randomness. Parameters of the hypernetwork are initialized from the global
RNG (like any ``nn.Module``; seed it before construction). In training mode
each forward draws ``train_members`` fresh codes with ``torch.randn``, so
seeding the global RNG reproduces them. In eval mode the ``predict_members``
fixed codes of the ``predict_codes`` buffer are used; they are drawn at
construction from a private generator seeded with ``HyperNetConfig.seed``
(the global RNG is untouched) and saved in the state dict.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from diverse.errors import UserError
from diverse.nets.ensemble import Params, capturing

__all__ = ["HyperNetConfig", "HyperNetwork", "LinearGenerator", "ChunkedGenerator",
           "NormalizedGenerator", "generate_with"]


@dataclass(frozen=True)
class HyperNetConfig:
    """Shape of the hypernetwork and how many networks it samples.

    Attributes:
        z_dim: dimension of the latent code z ~ N(0, I); default ``32``.
        hidden: width of the trunk MLP's hidden layers; default ``128``.
        depth: number of hidden layers of the trunk MLP (each Linear + tanh);
            default ``2``.
        code_dim: dimension of each per-layer code c_l (>= 2: codes are
            layer-normalized); default ``32``.
        chunk: tensors with more than ``chunk`` elements use the chunked
            generator with pieces of ``chunk`` elements; ``0`` never chunks.
            Default ``65536`` (every tensor of LeNet-5 and ResNet-20 is plain).
        train_members: networks sampled per training step (K in training mode);
            default ``5``.
        predict_members: networks used for prediction (K in eval mode); default
            ``10``.
        seed: seed of the fixed prediction codes ``predict_codes``; default ``0``
            (set it to the run's seed so different runs predict with different
            draws).
        spread: s in (0, 1], the share of the init that differs between
            members: a randomly initialized tensor starts as
            ``sqrt(1 − s²)·θ_target + s·G c`` (θ_target the target's own init
            draw), so members start with weight correlation 1 − s² and the
            target's init scale. s = 1: members start as independent inits and
            the mean network at 0 — measured on Fashion-MNIST LeNet, that does
            not train in 150 Adam steps (accuracy ≈ 0.1), while s = 0.3
            reaches 0.75 (lr 1e-3). After one epoch of HE-CKA training (LeNet,
            5 networks per step, lr 2e-3, seed 0) s = 0.3 / 0.1 / 0.03 give
            accuracy 0.839 / 0.845 / 0.848 and last-layer CKA between members
            0.47 / 0.56 / 0.39: the diversity term, not the init, sets how far
            members end apart. Default ``0.1``.
        code_lr: step size of the member-specific part of the generated
            weights relative to the mean network's under Adam (see
            :class:`LinearGenerator`); default ``1.0``.
        weight_norm: generate each randomly initialized weight (≥ 2 dims) in
            weight-normalized form (Salimans & Kingma 2016): the code sets
            each output row's direction, a shared learned gain its norm
            (:class:`NormalizedGenerator`); default ``False``.
    """

    z_dim: int = 32
    hidden: int = 128
    depth: int = 2
    code_dim: int = 32
    chunk: int = 65536
    train_members: int = 5
    predict_members: int = 10
    seed: int = 0
    spread: float = 0.1
    code_lr: float = 1.0
    weight_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("z_dim", "hidden", "depth", "code_dim", "train_members", "predict_members"):
            value, least = getattr(self, name), 2 if name == "code_dim" else 1
            if not _is_int(value) or value < least:
                raise UserError(f"hypernet {name} = {value!r}: must be an integer >= {least}")
        if not _is_int(self.chunk) or self.chunk < 0:
            raise UserError(
                f"hypernet chunk = {self.chunk!r}: must be an integer >= 1, or 0 for no chunking"
            )
        if not 0 < self.spread <= 1:
            raise UserError(f"hypernet spread = {self.spread!r}: must be in (0, 1]")
        if not (isinstance(self.code_lr, (int, float)) and math.isfinite(self.code_lr)
                and self.code_lr > 0):
            raise UserError(f"hypernet code_lr = {self.code_lr!r}: must be a number > 0")
        if not isinstance(self.weight_norm, bool):
            raise UserError(f"hypernet weight_norm = {self.weight_norm!r}: must be true or false")
        if not _is_int(self.seed) or self.seed < 0:
            raise UserError(f"hypernet seed = {self.seed!r}: must be an integer >= 0")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------ generators
def _moments(tensor: Tensor) -> tuple[float, float]:
    """Offset and scale of a generated tensor from the target's initial tensor.

    A constant tensor (biases, norm scales, zero-initialized branches) gives
    ``(value, 0)``: it is reproduced exactly. A random tensor gives ``(0,
    rms)``: random inits (Kaiming, Xavier, PyTorch's default uniform) are
    centred, and its sample mean is noise that must not become an offset
    shared by every member. (A one-element tensor counts as constant.)
    """
    t = tensor.detach().double()
    if t.numel() == 0 or bool((t == t.flatten()[0]).all()):
        return (t.flatten()[0].item() if t.numel() else 0.0), 0.0
    return 0.0, t.square().mean().sqrt().item()


class LinearGenerator(nn.Module):
    """One target tensor as an affine function of its layer code.

    ``θ = G c + b``: code ``(K, code_dim)`` → tensor ``(K, *shape)``. Init:
    ``G ~ N(0, std²/code_dim)``, ``b = mean`` (see the module docstring).
    G is stored as ``weight = G·code_dim/code_lr`` and applied as
    ``weight·(code·code_lr/code_dim)``.
    """

    def __init__(self, shape: Sequence[int], code_dim: int, mean: float, std: float,
                 code_lr: float = 1.0) -> None:
        super().__init__()
        self.shape = tuple(shape)
        numel = math.prod(self.shape)
        # stored × code_dim/code_lr and applied to code·code_lr/code_dim: same init, but an
        # Adam step of size lr on every entry moves a generated weight by ~code_lr·lr, not
        # ~code_dim·lr
        self.code_scale = code_lr / code_dim
        self.weight = nn.Parameter(torch.randn(numel, code_dim)
                                   * (std * math.sqrt(code_dim) / code_lr))
        self.bias = nn.Parameter(torch.as_tensor(mean, dtype=torch.float32).expand(numel).clone()
                                 if not isinstance(mean, Tensor) else mean.reshape(-1).clone())

    def forward(self, code: Tensor) -> Tensor:
        return F.linear(code * self.code_scale, self.weight, self.bias).reshape(
            code.shape[0], *self.shape)


class ChunkedGenerator(nn.Module):
    """A big target tensor generated in chunks that share one output basis.

    Flattened tensor cut into ``n = ceil(numel/chunk)`` pieces; piece j is
    ``B (A_j c) + b[piece j]`` with ``mix`` A: ``(n, code_dim, code_dim)``,
    ``basis`` B: ``(chunk, code_dim)``, ``bias`` b: ``(numel,)``. Code
    ``(K, code_dim)`` → tensor ``(K, *shape)``. Init: ``A ~ N(0, 1/code_dim)``,
    ``B ~ N(0, std²/code_dim)``, ``b = mean``. B is stored as ``basis =
    B/code_lr`` and applied as ``code_lr·basis``.
    """

    def __init__(
        self, shape: Sequence[int], code_dim: int, mean: float, std: float, chunk: int,
        code_lr: float = 1.0,
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        pieces = -(-self.numel // chunk)
        self.mix = nn.Parameter(torch.randn(pieces, code_dim, code_dim) / math.sqrt(code_dim))
        self.code_lr = code_lr
        self.basis = nn.Parameter(torch.randn(chunk, code_dim)
                                  * (std / math.sqrt(code_dim) / code_lr))
        self.bias = nn.Parameter(torch.as_tensor(mean, dtype=torch.float32).expand(self.numel)
                                 .clone() if not isinstance(mean, Tensor)
                                 else mean.reshape(-1).clone())

    def forward(self, code: Tensor) -> Tensor:
        piece_codes = torch.einsum("kc,jdc->kjd", code, self.mix)  # (K, n, code_dim)
        flat = (piece_codes @ (self.basis.T * self.code_lr)).reshape(code.shape[0], -1)
        flat = flat[:, : self.numel]
        return (flat + self.bias).reshape(code.shape[0], *self.shape)


class NormalizedGenerator(nn.Module):
    """A generator's tensor in weight-normalized form (Salimans & Kingma 2016).

    ``θ_k[i] = g_i · v_k[i] / ‖v_k[i]‖`` for each output row i (the first
    axis) of the inner generator's ``v`` ``(K, out, ...)``: the code chooses
    the rows' directions, the learned ``gain`` g ``(out,)``, shared by all
    members, their norms. Init: g = the row norms of the target's own initial
    tensor, so every generated network starts with the target's row norms.
    """

    def __init__(self, generator: nn.Module, gain: Tensor) -> None:
        super().__init__()
        self.generator = generator
        self.gain = nn.Parameter(gain.detach().float().clone())

    def forward(self, code: Tensor) -> Tensor:
        v = self.generator(code)
        norms = v.flatten(2).norm(dim=2).clamp_min(1e-12)  # (K, out)
        return v * (self.gain / norms).reshape(*norms.shape, *(1,) * (v.dim() - 2))


# ---------------------------------------------------------------- hypernetwork
def _check_target(target: nn.Module) -> None:
    for name, mod in target.named_modules():
        if isinstance(mod, _BatchNorm) or (
            isinstance(mod, _NormBase) and mod.track_running_stats
        ):
            raise UserError(
                f"hypernetwork target {type(target).__name__} has a {type(mod).__name__} "
                f"layer {name!r}: running statistics are not supported; use a norm-free "
                f"model or norm=\"group\" / \"none\""
            )
    if not any(True for _ in target.parameters()):
        raise UserError(f"hypernetwork target {type(target).__name__} has no parameters")


class HyperNetwork(nn.Module):
    """Generates the parameters of K target networks from K latent codes.

    Args:
        target: the target network skeleton (e.g. ``build_model(...)``); its
            parameter names and shapes define what is generated, its initial
            values only set the generators' init scale. It is copied to the
            ``meta`` device and kept outside the module tree, so
            ``named_parameters()`` holds only the hypernetwork's own
            parameters (``trunk.*``, ``head.*``, ``generators.<i>.*``).
        cfg: :class:`HyperNetConfig`.

    Attributes:
        names: the target's parameter names, in order (``generators[i]``
            generates ``names[i]``).
        layers: the target layers (owning modules) that get one code each.
        feature_layers: the target's ``feature_layers`` (``()`` if it has none).
        predict_codes: non-persistent buffer ``(predict_members, z_dim)``, the eval-mode
            codes (rebuilt from ``seed``, never saved).
    """

    generates_members = True  # forward returns (K, B, ...): K generated members

    def __init__(self, target: nn.Module, cfg: HyperNetConfig) -> None:
        super().__init__()
        if not isinstance(cfg, HyperNetConfig):
            raise UserError(f"hypernetwork needs a HyperNetConfig, got {type(cfg).__name__}")
        _check_target(target)
        self.cfg = cfg
        named = dict(target.named_parameters())
        self.names: tuple[str, ...] = tuple(named)
        self.layers: tuple[str, ...] = tuple(dict.fromkeys(_owner(n) for n in self.names))
        self._layer_of = tuple(self.layers.index(_owner(n)) for n in self.names)
        self.feature_layers: tuple[str, ...] = tuple(getattr(target, "feature_layers", ()))

        width = cfg.z_dim
        trunk: list[nn.Module] = []
        for _ in range(cfg.depth):
            linear = nn.Linear(width, cfg.hidden)
            nn.init.kaiming_normal_(linear.weight, nonlinearity="tanh")
            nn.init.zeros_(linear.bias)
            trunk += [linear, nn.Tanh()]
            width = cfg.hidden
        self.trunk = nn.Sequential(*trunk)
        self.head = nn.Linear(width, len(self.layers) * cfg.code_dim)
        nn.init.kaiming_normal_(self.head.weight, nonlinearity="linear")
        nn.init.zeros_(self.head.bias)

        generators: list[nn.Module] = []
        for tensor in named.values():
            mean, std = _moments(tensor)
            if std > 0 and cfg.spread < 1:  # mean network = the target's own init
                mean, std = tensor.detach().float() * math.sqrt(1 - cfg.spread**2), std * cfg.spread
            if cfg.chunk and tensor.numel() > cfg.chunk:
                generators.append(
                    ChunkedGenerator(tensor.shape, cfg.code_dim, mean, std, cfg.chunk,
                                     cfg.code_lr))
            else:
                generators.append(LinearGenerator(tensor.shape, cfg.code_dim, mean, std,
                                                  cfg.code_lr))
            if cfg.weight_norm and std > 0 and tensor.dim() >= 2:
                generators[-1] = NormalizedGenerator(
                    generators[-1], tensor.detach().flatten(1).norm(dim=1))
        self.generators = nn.ModuleList(generators)

        self.buffer_names: tuple[str, ...] = tuple(n for n, _ in target.named_buffers())
        for i, (_, buf) in enumerate(target.named_buffers()):
            self.register_buffer(f"target_buffer_{i}", buf.detach().clone(), persistent=False)
        rng = torch.Generator().manual_seed(cfg.seed)
        # derived from (seed, predict_members): not saved, so a trained
        # hypernetwork can be rebuilt with any number of prediction members
        self.register_buffer("predict_codes", torch.randn(cfg.predict_members, cfg.z_dim,
                                                          generator=rng), persistent=False)
        # the skeleton: structure only, no storage, not a submodule
        self._skeleton = (copy.deepcopy(target).to("meta"),)
        self._skeleton[0].train(self.training)

    # ------------------------------------------------------------ modes, codes
    @property
    def target(self) -> nn.Module:
        """The target skeleton (on the ``meta`` device; structure only)."""
        return self._skeleton[0]

    def train(self, mode: bool = True) -> HyperNetwork:
        """Set the mode of the hypernetwork and of the target (dropout)."""
        super().train(mode)
        self._skeleton[0].train(mode)
        return self

    @property
    def members(self) -> int:
        """K of the next forward: ``train_members`` (training) or ``predict_members``."""
        return self.cfg.train_members if self.training else self.cfg.predict_members

    def latents(self) -> Tensor:
        """Codes of the next forward, ``(K, z_dim)``.

        Training mode: ``train_members`` fresh draws ``torch.randn`` (global
        RNG). Eval mode: the fixed ``predict_codes``.
        """
        if not self.training:
            return self.predict_codes
        codes = self.predict_codes
        return torch.randn(self.cfg.train_members, self.cfg.z_dim,
                           device=codes.device, dtype=codes.dtype)

    # -------------------------------------------------------------- generation
    def layer_codes(self, z: Tensor) -> Tensor:
        """Per-layer codes ``c = LayerNorm(head(trunk(z)))``: ``(K, z_dim) → (K, L, code_dim)``."""
        if z.dim() != 2 or z.shape[1] != self.cfg.z_dim:
            raise UserError(
                f"hypernetwork codes have shape {tuple(z.shape)}: expected (K, {self.cfg.z_dim})"
            )
        codes = self.head(self.trunk(z)).reshape(z.shape[0], len(self.layers), self.cfg.code_dim)
        return F.layer_norm(codes, (self.cfg.code_dim,))

    def generate(self, z: Tensor) -> Params:
        """Codes ``(K, z_dim)`` → stacked target parameters ``{name: (K, *shape)}``.

        Differentiable with respect to the hypernetwork's parameters (and z).
        """
        codes = self.layer_codes(z)
        return {
            name: gen(codes[:, layer])
            for name, gen, layer in zip(self.names, self.generators, self._layer_of, strict=True)
        }

    def target_buffers(self, members: int) -> Params:
        """The target's buffers expanded to ``{name: (members, *shape)}`` (views).

        Norm-free targets usually have none (running statistics are refused).
        """
        bufs = (getattr(self, f"target_buffer_{i}") for i in range(len(self.buffer_names)))
        return {
            name: buf.expand(members, *buf.shape)
            for name, buf in zip(self.buffer_names, bufs, strict=True)
        }

    # ----------------------------------------------------------------- forward
    def _member(self, params: Params, buffers: Params, x: Tensor) -> Tensor:
        return functional_call(self.target, (params, buffers), (x,), strict=True)

    def apply(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Pure forward of generated members, ``(B, ...)`` → ``(K, B, C)``.

        ``params`` are stacked ``{name: (K, *shape)}`` (e.g. from
        :meth:`generate`); the input is shared by the K members.
        """
        members = next(iter(params.values())).shape[0]
        fn = vmap(self._member, in_dims=(0, 0, None), randomness="different")
        return fn(dict(params), self.target_buffers(members), x)

    def apply_features(
        self, params: Mapping[str, Tensor], x: Tensor, layers: Sequence[str]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`apply` plus named target layers' outputs ``{layer: (K, B, ...)}``.

        Forward hooks are registered inside the vmapped per-member function and
        the captured tensors are returned from it (as
        :meth:`diverse.nets.ensemble.Ensemble.features`), so features carry the
        member axis and stay differentiable.
        """
        layers = tuple(layers)
        member = capturing(self._member, self.target, layers, "the target")

        members = next(iter(params.values())).shape[0]
        fn = vmap(member, in_dims=(0, 0, None), randomness="different")
        out, feats = fn(dict(params), self.target_buffers(members), x)
        return out, dict(zip(layers, feats, strict=True))

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """Outputs of K generated networks on a shared batch: ``(B, ...)`` → ``(K, B, C)``.

        ``z`` defaults to :meth:`latents` (fresh draws in training mode, the
        fixed ``predict_codes`` in eval mode).
        """
        return self.apply(self.generate(self.latents() if z is None else z), x)

    def forward_features(
        self, x: Tensor, layers: Sequence[str], z: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`forward` plus the named target layers' outputs ``{layer: (K, B, ...)}``."""
        params = self.generate(self.latents() if z is None else z)
        return self.apply_features(params, x, layers)


def _owner(name: str) -> str:
    """The module owning a parameter: ``"classifier.fc1.weight"`` → ``"classifier.fc1"``."""
    return name.rpartition(".")[0]


class _Generation(nn.Module):
    """``z → hyper.generate(z)`` as a forward, so that it can be called functionally."""

    def __init__(self, hyper: HyperNetwork) -> None:
        super().__init__()
        self.hyper = hyper

    def forward(self, z: Tensor) -> Params:
        return self.hyper.generate(z)


def generate_with(hyper: HyperNetwork, params: Mapping[str, Tensor], z: Tensor) -> Params:
    """:meth:`HyperNetwork.generate` with the hypernetwork's parameters given explicitly.

    ``params`` are the hypernetwork's own parameters by name (e.g. one slot of
    a stacked :class:`diverse.nets.ensemble.Ensemble`), so gradients reach them.
    """
    return functional_call(_Generation(hyper), {f"hyper.{k}": v for k, v in params.items()},
                           (z,))
