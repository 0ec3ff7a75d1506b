"""Particle methods: conjugate Gaussian posterior, two modes, pull-back and diagnostics."""

import math

import pytest
import torch

from diverse.app.config import load_config
from diverse.app.train import build_run, train
from diverse.data.datasets import Dataset
from diverse.errors import UserError
from diverse.math import kernels
from diverse.methods.base import DeepEnsembleConfig, Step, deep_ensemble
from diverse.methods.forde import (
    forde_repulsion,
)
from diverse.methods.particles import (
    SVGDConfig,
    WGDConfig,
    function_space,
    leaf_update,
    on_points,
    prior_draws,
    repulsion_norms,
    svgd_direction,
    svgd_interaction,
    wgd_direction,
    wgd_interaction,
)
from diverse.methods.spaces import input_gradients, pca_lengthscales
from diverse.nets.ensemble import Ensemble, flatten_params
from diverse.nets.likelihoods import Categorical

NOISE, PRIOR = 0.5, 1.0


def linear_regression(seed=0, n=20, d=3):
    """y = [x, 1]·w + ε: Gaussian prior and noise → closed-form posterior N(μ, Σ)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    design = torch.cat([x, torch.ones(n, 1)], 1).double()
    y = design.float() @ torch.randn(d + 1, generator=g) + NOISE * torch.randn(n, generator=g)
    precision = design.T @ design / NOISE**2 + torch.eye(d + 1, dtype=torch.float64) / PRIOR**2
    cov = torch.linalg.inv(precision)
    mean = cov @ design.T @ y.double() / NOISE**2
    data = Dataset("blr", "regression", x, y[:, None], x, y[:, None], 1, {}, (0.0,), (1.0,))
    return data, mean, cov


def fit_particles(method, extra=(), steps=3000, members=100):
    data, mean, cov = linear_regression()
    cfg = load_config(None, [
        f"method.name={method}", *extra, "model.name=linear", "likelihood.name=gaussian",
        f"likelihood.noise_std={NOISE}", f"train.prior_std={PRIOR}", f"ensemble.members={members}",
        "ensemble.execution=vmap", f"train.steps={steps}", "train.batch_size=20",
        "train.lr=0.01", "train.schedule=constant", "train.eval_every=0",
        f"train.checkpoint_every={steps}"])
    run = build_run(cfg, data)
    return run, mean, cov


def particle_weights(run):
    p = run.ensemble.params
    return torch.cat([p["fc.weight"].flatten(1), p["fc.bias"].flatten(1)], 1).detach().double()


# (method, overrides, variance-ratio bounds): the acceptance
GAUSSIAN_CASES = [
    ("svgd", (), (0.6, 1.5)),
    ("wgd", ("method.estimator=kde",), (0.4, 1.5)),
    ("wgd", ("method.estimator=sge",), (0.6, 1.5)),
    ("wgd", ("method.estimator=ssge",), (0.6, 1.5)),
]


@pytest.mark.parametrize(("method", "extra", "bounds"), GAUSSIAN_CASES)
def test_particles_match_the_conjugate_gaussian_posterior(tmp_path, method, extra, bounds):
    run, mean, cov = fit_particles(method, extra)
    train(run, tmp_path, show_progress=False)
    w = particle_weights(run)
    sd = cov.diagonal().sqrt()
    assert ((w.mean(0) - mean) / sd).abs().max() < 0.2
    ratio = w.var(0) / cov.diagonal()
    assert bounds[0] <= ratio.min() and ratio.max() <= bounds[1], ratio


def test_deep_ensemble_spread_collapses_on_the_same_posterior(tmp_path):
    run, mean, cov = fit_particles("de")
    train(run, tmp_path, show_progress=False)
    w = particle_weights(run)
    assert ((w.mean(0) - mean) / cov.diagonal().sqrt()).abs().max() < 0.2
    assert (w.var(0) / cov.diagonal()).max() < 0.01


def _two_modes_score(z):
    """Score of ½N(−2·1, 0.5²I) + ½N(2·1, 0.5²I) in 2D, ``(M, 2)``."""
    z = z.detach().requires_grad_(True)
    centres = torch.tensor([[-2.0, -2.0], [2.0, 2.0]], dtype=z.dtype)
    logp = torch.logsumexp(-((z[:, None] - centres) ** 2).sum(-1) / (2 * 0.25), dim=1)
    (g,) = torch.autograd.grad(logp.sum(), z)
    return g


@pytest.mark.parametrize("direction", [
    svgd_direction(SVGDConfig()),
    wgd_direction(WGDConfig(estimator="kde")),
    wgd_direction(WGDConfig(estimator="sge")),
    wgd_direction(WGDConfig(estimator="ssge")),
], ids=["svgd", "wgd-kde", "wgd-sge", "wgd-ssge"])
def test_particles_cover_both_modes_of_a_two_mode_target(direction):
    torch.manual_seed(0)
    z = (torch.randn(60, 2, dtype=torch.float64) * 0.5).requires_grad_(True)  # start between
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(600):
        phi, logs = direction(z.detach(), _two_modes_score(z), 1.0, 1.0)
        z.grad = -phi
        opt.step()
    side = (z.detach().sum(1) > 0).double().mean()
    assert 0.3 <= side <= 0.7  # both modes hold a good share of the particles
    near = torch.minimum((z.detach() - 2).norm(dim=1), (z.detach() + 2).norm(dim=1))
    assert near.median() < 1.0  # and sit on them, not in between
    assert logs["repulsion_norm"] > 0 and logs["bandwidth"] > 0


def test_function_space_driving_term_pulls_back_to_the_deep_ensemble_gradient():
    torch.manual_seed(0)
    from diverse.nets.models import MLPConfig, build_model

    ens = Ensemble(lambda: build_model(MLPConfig(hidden=(8,)), (5,), 3), 4, seed=0)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    step = Step(ens, x, y, Categorical(), n_train=100, prior_std=0.0, progress=0.0)
    no_repulsion = function_space(WGDConfig(name="f-wgd"), lambda z, d, a, c: (a * d, {}))
    got = no_repulsion(step).grads
    want = deep_ensemble(DeepEnsembleConfig())(step).grads
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


def test_wgd_kde_direction_is_driving_minus_kde_score():
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    drive = torch.randn(3, 2, dtype=torch.float64)
    phi, logs = wgd_direction(WGDConfig(estimator="kde", bandwidth="fixed",
                                        bandwidth_value=2.0))(z, drive, 0.5, 0.1)
    sq = torch.cdist(z, z) ** 2
    k = torch.exp(-sq / 2.0)
    grad_first = -2.0 / 2.0 * (z[:, None] - z[None]) * k[..., None]  # ∇_{z_i} k(z_i, z_j)
    score = grad_first.sum(1) / k.sum(1, keepdim=True)
    torch.testing.assert_close(phi, 0.5 * drive - 0.1 * score)
    assert math.isclose(logs["bandwidth"], 2.0)


def test_forde_repulsion_gradient_is_a_kde_score_in_input_gradient_space():
    torch.manual_seed(0)
    m, b_count = 4, 3
    s = torch.randn(m, b_count, 5, dtype=torch.float64, requires_grad=True)
    log_k, _ = forde_repulsion(s)
    (g,) = torch.autograd.grad(log_k.sum(), s)
    # reference by loops: h_jb = (true) median_i d²_ijb / log M (self-distance included);
    # ∂/∂s_ib log Σ_j k_ij = Σ_j (1/B) κ_ijb (−2/h_jb)(s_ib − s_jb) / Σ_j k_ij
    sd = s.detach()
    kappa, bandwidth = torch.zeros(b_count, m, m, dtype=torch.float64), []
    for b in range(b_count):
        d2 = torch.cdist(sd[:, b], sd[:, b]) ** 2
        h = torch.stack([torch.sort(d2[:, j]).values[1:3].mean() for j in range(m)])
        h = h / math.log(m) + 1e-12
        bandwidth.append(h)
        kappa[b] = torch.exp(-d2 / h[None, :])
    k = kappa.mean(0)
    ref = torch.zeros_like(sd)
    for b in range(b_count):
        for i in range(m):
            for j in range(m):
                ref[i, b] += (kappa[b, i, j] / b_count) * (-2 / bandwidth[b][j]) * (
                    sd[i, b] - sd[j, b]) / k[i].sum()
    torch.testing.assert_close(log_k.detach(), k.sum(1).log())
    torch.testing.assert_close(g, ref)


def test_input_gradients_are_each_members_own():
    torch.manual_seed(0)
    from diverse.nets.models import MLPConfig, build_model

    ens = Ensemble(lambda: build_model(MLPConfig(hidden=(8,), activation="tanh"), (5,), 3), 3)
    x, y = torch.randn(4, 5), torch.tensor([0, 2, 1, 1])
    grads, _ = input_gradients(ens, ens.params, x, y, create_graph=False)
    for m in range(3):
        member = ens.member(m)
        xm = x.clone().requires_grad_(True)
        member(xm).gather(1, y[:, None]).sum().backward()
        torch.testing.assert_close(grads[m], xm.grad)


def test_pca_lengthscales_whiten_the_covariance():
    torch.manual_seed(0)
    x = torch.randn(2000, 3) @ torch.tensor([[2.0, 0, 0], [0.5, 1, 0], [0, 0, 0.1]])
    metric = pca_lengthscales(x, alpha=1.0, form="correlation")
    xs = (x - x.mean(0)) / x.std(0)
    cov = torch.cov(xs.T.double())
    lam = torch.linalg.eigvalsh(cov)
    torch.testing.assert_close(metric.scale.double().square().sort().values, lam, atol=1e-4,
                               rtol=1e-4)
    assert torch.equal(pca_lengthscales(x, alpha=0.0).scale, torch.ones(3))


def test_fgsm_inputs_and_their_likelihood_term():
    torch.manual_seed(0)
    from diverse.methods.particles import adversarial_nll, fgsm_inputs
    from diverse.nets.models import MLPConfig, build_model

    ens = Ensemble(lambda: build_model(MLPConfig(hidden=(8,)), (5,), 3), 2, seed=0)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    step = Step(ens, x, y, Categorical(), n_train=100, prior_std=0.0, progress=0.0)
    xs = fgsm_inputs(step, ens.params, 0.1)
    for m in range(2):
        xm = x.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(ens.member(m)(xm), y, reduction="sum").backward()
        torch.testing.assert_close(xs[m], x + 0.1 * xm.grad.sign())
        want = torch.nn.functional.cross_entropy(ens.member(m)(xs[m]), y)
        torch.testing.assert_close(adversarial_nll(step, ens.params, 0.1)[m], want)
    assert torch.equal(adversarial_nll(step, ens.params, 0.0), torch.zeros(2))


def test_f_svgd_refuses_softmax_outputs():
    with pytest.raises(UserError, match="f-svgd needs output = \"logits\""):
        build_run(load_config(None, ["data.name=digits", "method.name=f-svgd",
                                     "method.output=softmax"]))


@pytest.mark.parametrize("cfg", [SVGDConfig(), SVGDConfig(kernel="imq"),
                                 WGDConfig(estimator="kde", kernel="laplace"),
                                 WGDConfig(estimator="sge"),
                                 WGDConfig(estimator="ssge", num_eigen=3)],
                         ids=["svgd", "svgd-imq", "wgd-kde-laplace", "wgd-sge", "wgd-ssge"])
def test_the_update_on_leaves_equals_the_update_on_flattened_particles(cfg):
    gen = torch.Generator().manual_seed(3)
    leaves = {"w": torch.randn(5, 3, 4, generator=gen, dtype=torch.float64),
              "b": torch.randn(5, 7, generator=gen, dtype=torch.float64)}
    grads = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64)
             for k, v in leaves.items()}
    interactor = (wgd_interaction if isinstance(cfg, WGDConfig) else svgd_interaction)(cfg)
    gram = kernels.gram(leaves.values())
    it = interactor(kernels.sq_dists_from_gram(gram), 0.7, 0.2)
    mixes = not isinstance(it.drive, float)
    got, driving = leaf_update(it, {k: g.clone() for k, g in grads.items()}, leaves,
                               grads if mixes else None)
    phi, logs = on_points(interactor)(flatten_params(leaves), -flatten_params(grads), 0.7, 0.2)
    torch.testing.assert_close(flatten_params(got), -phi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(driving.mean(), logs["driving_norm"])
    torch.testing.assert_close(repulsion_norms(it, gram).mean(), logs["repulsion_norm"])


def test_prior_draws_are_torch_randn_times_std_and_reuse_their_buffers():
    params = {"w": torch.zeros(3, 30, 40), "b": torch.zeros(3, 5)}
    torch.manual_seed(4)
    want = {k: torch.randn((8, *v.shape[1:])) * 0.5 for k, v in params.items()}
    out: dict = {}
    torch.manual_seed(4)
    draws = prior_draws(params, 8, 0.5, out=out)
    for k in params:
        assert torch.equal(draws[k], want[k])  # the same numbers, one pass
    again = prior_draws(params, 8, 0.5, out=out)
    assert again["w"] is out["w"] and not torch.equal(again["w"], want["w"])  # fresh draws
    assert prior_draws(params, 6, 0.5, out=out)["w"].shape == (6, 30, 40)  # a new size
