"""Likelihoods against torch.distributions / cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from diverse.errors import UserError
from diverse.nets.likelihoods import Categorical, Gaussian, LikelihoodConfig, build_likelihood


def test_categorical_nll_is_cross_entropy_per_member():
    torch.manual_seed(0)
    logits, y = torch.randn(3, 7, 5), torch.randint(0, 5, (7,))
    nll = Categorical().nll(logits, y)
    assert nll.shape == (3, 7)
    for m in range(3):
        torch.testing.assert_close(nll[m], F.cross_entropy(logits[m], y, reduction="none"))
    torch.testing.assert_close(Categorical().predict(logits)["probs"].sum(-1), torch.ones(3, 7))


def test_gaussian_fixed_noise_matches_normal_log_prob():
    torch.manual_seed(0)
    out, y = torch.randn(2, 6, 1), torch.randn(6, 1)
    lik = Gaussian(0.25, learn_noise=False)
    ref = -torch.distributions.Normal(out, 0.25).log_prob(y).sum(-1)
    torch.testing.assert_close(lik.nll(out, y), ref)
    assert lik.outputs_per_target(1) == 1


def test_gaussian_learned_noise_uses_softplus_scale():
    torch.manual_seed(0)
    out, y = torch.randn(2, 6, 2), torch.randn(6, 1)
    lik = Gaussian(0.25, learn_noise=True)
    std = F.softplus(out[..., 1:]) + 1e-4
    ref = -torch.distributions.Normal(out[..., :1], std).log_prob(y).sum(-1)
    torch.testing.assert_close(lik.nll(out, y), ref)
    pred = lik.predict(out)
    torch.testing.assert_close(pred["stds"], std)
    assert lik.outputs_per_target(1) == 2
    # closed form at the optimum: μ = y, σ = 1 → ½ log 2π
    opt = torch.tensor([[[0.0, math.log(math.e - 1)]]])
    assert abs(lik.nll(opt, torch.zeros(1, 1)).item() - 0.5 * math.log(2 * math.pi)) < 1e-3


def test_bad_likelihood_names_and_noise():
    with pytest.raises(UserError, match="'poisson'"):
        build_likelihood(LikelihoodConfig(name="poisson"))
    with pytest.raises(UserError, match="noise_std = 0"):
        build_likelihood(LikelihoodConfig(name="gaussian", noise_std=0))
