"""Mean-field layers: local-reparameterization moments, conversion, closed-form KL and W2."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

from diverse.errors import UserError
from diverse.nets.bayes import (
    MeanFieldConv2d,
    MeanFieldLinear,
    diagonal_w2_squared,
    mean_field_count,
    mean_field_kl,
    pairwise_w2_squared,
    set_sampling,
    sigma_of,
    to_mean_field,
)
from diverse.nets.ensemble import Ensemble
from diverse.nets.models import MLP, CifarResNet, LeNet5


def _randomize(layer, rho_low=-2.0, rho_high=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("_rho"):
                p.copy_(torch.empty(p.shape).uniform_(rho_low, rho_high, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g))
    return layer


def _check_moments(samples, mean, var):
    """Empirical mean within 5 standard errors; variance within 5 standard errors."""
    s = samples.shape[0]
    emp_mean, emp_var = samples.mean(0), samples.var(0)
    assert torch.all((emp_mean - mean).abs() <= 5 * (var / s).sqrt())
    # the sample variance of Gaussians has standard error var·sqrt(2/(S−1))
    assert torch.all((emp_var - var).abs() <= 5 * var * (2.0 / (s - 1)) ** 0.5)


def test_linear_local_reparameterization_matches_closed_form_moments():
    torch.manual_seed(0)
    layer = _randomize(MeanFieldLinear(5, 4))
    x = torch.randn(3, 5)
    s = 40_000
    with torch.no_grad():
        out = layer(x.expand(s, 3, 5))  # (S, 3, 4): independent draws per row
    mu, sw = layer.weight_mu, sigma_of(layer.weight_rho)
    mean = x @ mu.T + layer.bias_mu
    var = x.square() @ sw.square().T + sigma_of(layer.bias_rho).square()
    _check_moments(out.double(), mean.detach().double(), var.detach().double())
    # the variance is not trivially the prior's: it differs across outputs by > 10%
    assert var.max() / var.min() > 1.1


def test_linear_eval_mode_samples_by_default_and_gives_the_mean_when_asked():
    layer = _randomize(MeanFieldLinear(5, 4)).eval()
    x = torch.randn(2, 5)
    with torch.no_grad():
        mean = x @ layer.weight_mu.T + layer.bias_mu
        assert (layer(x) - mean).abs().max() > 1e-2  # still Monte Carlo in eval mode
        set_sampling(layer, False)
        torch.testing.assert_close(layer(x), mean)
        layer.train()
        assert (layer(x) - mean).abs().max() > 1e-2  # training always samples


def test_conv_local_reparameterization_matches_closed_form_moments():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    layer = _randomize(MeanFieldConv2d(conv), seed=1)
    x = torch.randn(1, 2, 6, 6)
    s = 20_000
    with torch.no_grad():
        out = layer(x.expand(s, 2, 6, 6))
    mean = F.conv2d(x, layer.weight_mu, layer.bias_mu, stride=2, padding=1)[0]
    var = F.conv2d(x.square(), sigma_of(layer.weight_rho).square(),
                   sigma_of(layer.bias_rho).square(), stride=2, padding=1)[0]
    assert out.shape == (s, 3, 3, 3)
    _check_moments(out.double(), mean.detach().double(), var.detach().double())


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("make, shape", [
    (lambda: MLP((6,), 3, (8, 8)), (6,)),
    (lambda: LeNet5((1, 28, 28), 10), (1, 28, 28)),
    (lambda: CifarResNet(8, 3, 10, "batch", 8, 8), (3, 12, 12)),
])
def test_to_mean_field_keeps_function_and_names_when_sigma_vanishes(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(4, *shape)
    mf = to_mean_field(model, prior_std=0.5, init_rho=-30.0).eval()
    torch.testing.assert_close(_outputs(mf, x), _outputs(model, x), atol=1e-4, rtol=1e-4)
    assert [n for n, _ in mf.named_modules()] == [n for n, _ in model.named_modules()]
    assert mf.feature_layers == model.feature_layers
    # every Linear/Conv2d replaced, μ = the original weights, ρ = init_rho
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    converted = dict(mf.named_modules())
    assert originals
    for n, m in originals.items():
        new = converted[n]
        assert isinstance(new, MeanFieldLinear | MeanFieldConv2d)
        assert torch.equal(new.weight_mu, m.weight) and torch.all(new.weight_rho == -30.0)
        assert new.prior_std == 0.5
    assert isinstance(dict(model.named_modules())[next(iter(originals))], nn.Linear | nn.Conv2d)
    params = dict(mf.named_parameters())
    n_weights = sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel())
                    for m in originals.values())
    assert mean_field_count({k: v.unsqueeze(0) for k, v in params.items()}) == n_weights


def test_to_mean_field_rejects_bad_values():
    with pytest.raises(UserError, match="prior_std"):
        to_mean_field(nn.Linear(2, 2), prior_std=0.0)
    with pytest.raises(UserError, match="init_rho"):
        to_mean_field(nn.Linear(2, 2), init_rho=float("nan"))


def _stacked(m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight_mu": torch.randn(m, 4, 3, generator=g, dtype=torch.float64),
        "fc.weight_rho": torch.randn(m, 4, 3, generator=g, dtype=torch.float64) - 1.0,
        "fc.bias_mu": torch.randn(m, 4, generator=g, dtype=torch.float64),
        "fc.bias_rho": torch.randn(m, 4, generator=g, dtype=torch.float64),
        "norm.weight": torch.randn(m, 4, generator=g, dtype=torch.float64),  # not mean-field
    }


def test_mean_field_kl_matches_torch_distributions():
    params, prior_std = _stacked(), 0.7
    expected = torch.stack([
        sum(kl_divergence(Normal(params[f"fc.{p}_mu"][m], F.softplus(params[f"fc.{p}_rho"][m])),
                          Normal(0.0, prior_std)).sum() for p in ("weight", "bias"))
        for m in range(3)
    ])
    torch.testing.assert_close(mean_field_kl(params, prior_std), expected)
    # a layer's own kl() agrees with the stacked function
    layer = _randomize(MeanFieldLinear(3, 2), seed=3)
    layer.prior_std = 0.7
    want = sum(kl_divergence(Normal(layer.get_parameter(f"{p}_mu"),
                                    F.softplus(layer.get_parameter(f"{p}_rho"))),
                             Normal(0.0, 0.7)).sum() for p in ("weight", "bias"))
    torch.testing.assert_close(layer.kl(), want)


def test_mean_field_kl_is_stable_for_very_negative_rho():
    mu = torch.tensor([[0.3, -0.2]])
    rho = torch.tensor([[-60.0, -120.0]], requires_grad=True)  # softplus underflows at -120
    kl = mean_field_kl({"w_mu": mu, "w_rho": rho}, 1.0)
    # log σ = ρ there: KL = Σ −ρ + μ²/2 − ½ (σ² negligible)
    expected = (-rho.detach() + mu.square() / 2 - 0.5).sum()
    torch.testing.assert_close(kl[0], expected)
    kl.sum().backward()
    torch.testing.assert_close(rho.grad, torch.tensor([[-1.0, -1.0]]))


def test_diagonal_w2_matches_numpy_and_the_general_gaussian_formula():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    s1, s2 = rng.uniform(0.1, 2.0, size=4), rng.uniform(0.1, 2.0, size=4)
    got = diagonal_w2_squared(*(torch.tensor(a) for a in (mu1, s1, mu2, s2))).item()
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    cov1, cov2 = np.diag(s1**2), np.diag(s2**2)
    root2 = scipy.linalg.sqrtm(cov2)
    cross = scipy.linalg.sqrtm(root2 @ cov1 @ root2)
    general = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * np.real(cross))
    assert got == pytest.approx(closed, rel=1e-12)
    assert got == pytest.approx(general, rel=1e-9)


def test_pairwise_w2_matches_the_pairwise_closed_form_and_grads_reach_rows_only():
    params = {k: v.clone().requires_grad_(True) for k, v in _stacked(m=3, seed=2).items()}
    w2 = pairwise_w2_squared(params)
    for k in range(3):
        for j in range(3):
            want = sum(diagonal_w2_squared(params[f"fc.{p}_mu"][k],
                                           F.softplus(params[f"fc.{p}_rho"][k]),
                                           params[f"fc.{p}_mu"][j],
                                           F.softplus(params[f"fc.{p}_rho"][j]))
                       for p in ("weight", "bias"))
            torch.testing.assert_close(w2[k, j], want)
    assert torch.all(w2.diagonal() == 0)
    detached = {k: v.detach() for k, v in params.items()}
    rows = pairwise_w2_squared(params, detached)
    (g,) = torch.autograd.grad(rows[0, 1], [params["fc.weight_mu"]])
    mu = params["fc.weight_mu"].detach()
    torch.testing.assert_close(g[0], 2 * (mu[0] - mu[1]))
    assert torch.all(g[1:] == 0)


def test_ensemble_vmap_equals_loop_when_sigma_vanishes():
    def factory():
        return to_mean_field(MLP((5,), 3, (8,)), init_rho=-30.0)

    x = torch.randn(6, 5)
    out = {ex: Ensemble(factory, 3, seed=4, execution=ex)(x).detach() for ex in ("vmap", "loop")}
    torch.testing.assert_close(out["vmap"], out["loop"], atol=1e-5, rtol=1e-5)
    assert (out["vmap"][0] - out["vmap"][1]).abs().max() > 1e-2  # members differ by init


def test_members_draw_their_own_noise_under_vmap():
    def factory():
        torch.manual_seed(0)  # identical members
        return to_mean_field(MLP((5,), 3, (8,)), init_rho=1.0)

    ens = Ensemble(factory, 2, execution="vmap")
    assert all(torch.equal(v[0], v[1]) for v in ens.params.values())
    x = torch.randn(4, 5)
    torch.manual_seed(1)
    out = ens(x).detach()
    assert (out[0] - out[1]).abs().min() > 1e-4  # every entry differs
    torch.manual_seed(1)
    torch.testing.assert_close(ens(x).detach(), out)  # reproducible from the global RNG
