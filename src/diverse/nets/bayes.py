"""Mean-field Gaussian Bayesian layers and their closed-form divergences.

A mean-field layer holds a factorized Gaussian q(w) = Π N(w_i; μ_i, σ_i²)
over its weights and bias, parameterized by ``μ`` and ``ρ`` with
``σ = softplus(ρ)`` (Blundell et al. 2015, "Weight uncertainty in neural
networks"). The forward pass uses the local reparameterization trick (Kingma,
Salimans & Welling 2015, "Variational dropout and the local reparameterization
trick"): instead of sampling a weight matrix, it samples the pre-activations,
which are Gaussian given the input,

    mean = x μᵀ + b_μ,    var = x² (σ²)ᵀ + σ_b²,    out = mean + sqrt(var + ε₀)·ξ,

with ξ ~ N(0, I) drawn by ``torch.randn_like`` from torch's global RNG, so that
under ``torch.func.vmap(randomness="different")`` every ensemble member draws
its own noise. ε₀ = 1e-12 (a standard-deviation floor of 1e-6) keeps the square
root differentiable where the variance is exactly 0 (zero inputs, no bias).
For convolutions the same moments are ``conv(x, μ) + b_μ`` and
``conv(x², σ²) + σ_b²``; the noise is drawn independently per output location,
which ignores the correlation that weight sharing induces between locations
(the usual approximation of Kingma et al. 2015 for convolutions).

The pure functions below work on stacked parameter dicts ``{name: (M, *shape)}``
(see :mod:`diverse.nets.ensemble`); a mean-field tensor is the pair of entries
``<prefix>_mu`` and ``<prefix>_rho``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diverse.errors import UserError

VAR_FLOOR = 1e-12
"""ε₀ added to the pre-activation variance before the square root."""


def sigma_of(rho: Tensor) -> Tensor:
    """σ = softplus(ρ), elementwise."""
    return F.softplus(rho)


def log_sigma_of(rho: Tensor) -> Tensor:
    """log softplus(ρ), stable for very negative ρ (where softplus(ρ) ≈ e^ρ)."""
    return torch.where(rho < -20.0, rho, F.softplus(rho).clamp_min(1e-30).log())


def _sample(mean: Tensor, var: Tensor) -> Tensor:
    return mean + torch.sqrt(var + VAR_FLOOR) * torch.randn_like(mean)


class _MeanField(nn.Module):
    """Shared parts of the mean-field layers.

    Attributes:
        sample_in_eval: in eval mode, draw a sample (``True``, default: Monte
            Carlo prediction) or return the mean pre-activation (``False``).
            Training mode always samples.
        prior_std: σ_p of the layer's N(0, σ_p² I) prior (used by
            :meth:`kl`; the stacked-parameter function is :func:`mean_field_kl`).
    """

    weight_mu: nn.Parameter
    weight_rho: nn.Parameter
    bias_mu: nn.Parameter | None
    bias_rho: nn.Parameter | None

    def _init_params(
        self, weight: Tensor, bias: Tensor | None, init_rho: float, prior_std: float
    ) -> None:
        self.weight_mu = nn.Parameter(weight.detach().clone())
        self.weight_rho = nn.Parameter(torch.full_like(weight.detach(), init_rho))
        if bias is None:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
        else:
            self.bias_mu = nn.Parameter(bias.detach().clone())
            self.bias_rho = nn.Parameter(torch.full_like(bias.detach(), init_rho))
        self.prior_std = prior_std
        self.sample_in_eval = True

    @property
    def sampling(self) -> bool:
        """Whether the next forward draws a sample (train mode, or eval with sampling on)."""
        return self.training or self.sample_in_eval

    def _bias_var(self) -> Tensor | None:
        return None if self.bias_rho is None else sigma_of(self.bias_rho).square()

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, σ_p² I)) of this layer, a scalar."""
        params = {"weight_mu": self.weight_mu, "weight_rho": self.weight_rho}
        if self.bias_mu is not None and self.bias_rho is not None:
            params.update(bias_mu=self.bias_mu, bias_rho=self.bias_rho)
        return mean_field_kl({k: v.unsqueeze(0) for k, v in params.items()}, self.prior_std)[0]


class MeanFieldLinear(_MeanField):
    """``nn.Linear`` with a mean-field Gaussian weight posterior.

    Shapes: ``(B, *, I) -> (B, *, O)``. Parameters ``weight_mu``, ``weight_rho``
    ``(O, I)`` and ``bias_mu``, ``bias_rho`` ``(O,)`` (``None`` without bias).
    Forward: local reparameterization, see the module docstring.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        init_rho: float = -5.0,
        prior_std: float = 1.0,
    ) -> None:
        super().__init__()
        ref = nn.Linear(in_features, out_features, bias=bias)
        self.in_features = in_features
        self.out_features = out_features
        self._init_params(ref.weight, ref.bias, init_rho, prior_std)

    @classmethod
    def from_linear(
        cls, layer: nn.Linear, *, init_rho: float = -5.0, prior_std: float = 1.0
    ) -> MeanFieldLinear:
        """μ copied from ``layer``'s weight and bias; ρ = ``init_rho`` everywhere."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new._init_params(layer.weight, layer.bias, init_rho, prior_std)
        return new

    def forward(self, x: Tensor) -> Tensor:
        mean = F.linear(x, self.weight_mu, self.bias_mu)
        if not self.sampling:
            return mean
        var = F.linear(x.square(), sigma_of(self.weight_rho).square(), self._bias_var())
        return _sample(mean, var)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias_mu is not None}, prior_std={self.prior_std}")


class MeanFieldConv2d(_MeanField):
    """``nn.Conv2d`` (zero padding) with a mean-field Gaussian weight posterior.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H', W')`` as the original conv.
    Parameters ``weight_mu``, ``weight_rho`` ``(C_out, C_in/groups, kH, kW)``,
    ``bias_mu``, ``bias_rho`` ``(C_out,)`` or ``None``. Forward: local
    reparameterization with moments ``conv(x, μ) + b_μ`` and
    ``conv(x², σ²) + σ_b²``, noise independent per output location.
    """

    def __init__(self, conv: nn.Conv2d, *, init_rho: float = -5.0, prior_std: float = 1.0) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise UserError(
                f"mean-field conv: padding_mode = {conv.padding_mode!r}: only 'zeros' is supported"
            )
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._init_params(conv.weight, conv.bias, init_rho, prior_std)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        mean = self._conv(x, self.weight_mu, self.bias_mu)
        if not self.sampling:
            return mean
        var = self._conv(x.square(), sigma_of(self.weight_rho).square(), self._bias_var())
        return _sample(mean, var)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, "
                f"bias={self.bias_mu is not None}, prior_std={self.prior_std}")


MEAN_FIELD_LAYERS = (MeanFieldLinear, MeanFieldConv2d)


def to_mean_field(module: nn.Module, prior_std: float = 1.0, init_rho: float = -5.0) -> nn.Module:
    """A copy of ``module`` with every ``nn.Linear``/``nn.Conv2d`` made mean-field.

    Module names are kept (``fc1`` stays ``fc1``; its parameters become
    ``fc1.weight_mu``, ``fc1.weight_rho``, ``fc1.bias_mu``, ``fc1.bias_rho``),
    as are all other attributes (e.g. ``feature_layers``). μ is the original
    weight, so the network's initialization is kept; ρ = ``init_rho``
    (σ = softplus(−5) ≈ 6.7e-3 by default). Other parameters (norm layers)
    stay deterministic. ``module`` itself is not modified.
    """
    if not prior_std > 0 or not math.isfinite(prior_std):
        raise UserError(f"mean-field prior_std = {prior_std}: must be a finite number > 0")
    if not math.isfinite(init_rho):
        raise UserError(f"mean-field init_rho = {init_rho}: must be a finite number")
    root = copy.deepcopy(module)

    def convert(child: nn.Module) -> nn.Module | None:
        if isinstance(child, nn.Linear):
            return MeanFieldLinear.from_linear(child, init_rho=init_rho, prior_std=prior_std)
        if isinstance(child, nn.Conv2d):
            return MeanFieldConv2d(child, init_rho=init_rho, prior_std=prior_std)
        return None

    top = convert(root)
    if top is not None:
        return top
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            new = convert(child)
            if new is not None:
                setattr(parent, name, new)
    return root


def set_sampling(module: nn.Module, sample_in_eval: bool) -> nn.Module:
    """Set ``sample_in_eval`` on every mean-field layer of ``module`` (returns it).

    ``False`` makes eval-mode forwards use the posterior mean; training mode
    always samples.
    """
    for m in module.modules():
        if isinstance(m, MEAN_FIELD_LAYERS):
            m.sample_in_eval = sample_in_eval
    return module


# ---------------------------------------------------------------- stacked params


def mean_field_names(params: Mapping[str, Tensor]) -> list[str]:
    """Prefixes ``p`` with both ``p_mu`` and ``p_rho`` in ``params``, in dict order."""
    return [k[:-3] for k in params if k.endswith("_mu") and f"{k[:-3]}_rho" in params]


def mean_field_count(params: Mapping[str, Tensor]) -> int:
    """Number D of mean-field weight coordinates per member."""
    return sum(params[f"{p}_mu"][0].numel() for p in mean_field_names(params))


def mean_field_kl(params: Mapping[str, Tensor], prior_std: float) -> Tensor:
    """Per-member KL(q_m ‖ N(0, σ_p² I)) over all mean-field tensors, ``(M,)``.

    Closed form for factorized Gaussians, summed over every coordinate i:

        KL = Σ_i [ log(σ_p / σ_i) + (σ_i² + μ_i²) / (2σ_p²) − ½ ],   σ_i = softplus(ρ_i).

    ``params`` is a stacked dict ``{name: (M, *shape)}``; entries that are not
    ``_mu``/``_rho`` pairs are ignored. Zero when there are none.
    """
    names = mean_field_names(params)
    if not names:
        first = next(iter(params.values()))
        return first.new_zeros(first.shape[0])
    total = 0.0
    for p in names:
        mu, rho = params[f"{p}_mu"], params[f"{p}_rho"]
        log_sigma = log_sigma_of(rho)
        var_ratio = (torch.exp(2.0 * log_sigma) + mu.square()) / (2.0 * prior_std**2)
        kl = math.log(prior_std) - log_sigma + var_ratio - 0.5
        total = total + kl.reshape(kl.shape[0], -1).sum(1)
    return total


def diagonal_w2_squared(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance of two diagonal Gaussians, a scalar.

    W2²(N(μ₁, diag σ₁²), N(μ₂, diag σ₂²)) = ‖μ₁ − μ₂‖² + ‖σ₁ − σ₂‖², summed
    over all elements (the general Gaussian formula with commuting covariances).
    """
    return (mu1 - mu2).square().sum() + (sigma1 - sigma2).square().sum()


def pairwise_w2_squared(
    params: Mapping[str, Tensor], others: Mapping[str, Tensor] | None = None
) -> Tensor:
    """W2² between the members' mean-field posteriors, ``(M, N)``.

    Entry ``[k, j]`` is ``Σ_tensors ‖μ_k − μ'_j‖² + ‖σ_k − σ'_j‖²`` with the
    rows from ``params`` and the columns from ``others`` (default ``params``;
    pass a detached copy to let gradients reach the rows only). Computed from
    explicit differences, one tensor at a time (exact, ``M·N·size`` memory).
    """
    others = params if others is None else others
    names = mean_field_names(params)
    if not names:
        raise UserError("pairwise W2: the parameters hold no mean-field (_mu/_rho) tensors")
    total: Tensor | float = 0.0
    for p in names:
        for a, b in ((params[f"{p}_mu"], others[f"{p}_mu"]),
                     (sigma_of(params[f"{p}_rho"]), sigma_of(others[f"{p}_rho"]))):
            a2, b2 = a.reshape(a.shape[0], 1, -1), b.reshape(1, b.shape[0], -1)
            total = total + (a2 - b2).square().sum(-1)
    assert isinstance(total, Tensor)
    return total
