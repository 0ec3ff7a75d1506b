"""Bayesian baselines against closed forms: SWAG moments and covariance, SGHMC on a Gaussian,
the VI objective's gradient, MC-dropout weight masks, Laplace against the GGN diagonal."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from torch import nn
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from diverse.app.config import load_config
from diverse.app.train import build_run, predict, predict_run, train
from diverse.data.datasets import DataConfig, load_dataset
from diverse.errors import UserError
from diverse.methods.base import Step
from diverse.methods.laplace_fit import LaplaceConfig, fit_laplace, random_names, unflatten_draws
from diverse.methods.mc_dropout import MCDropout, dropout_targets, masked_weights, to_mc_dropout
from diverse.methods.sghmc import SGHMCConfig, sample_due, sghmc_step, step_size
from diverse.methods.swag import SWAGState, swag_collect, swag_sample
from diverse.nets.models import MLP, LeNet5, LinearModel

BASE = ["data.name=digits", "data.train_subset=256", "data.test_subset=100", "model.name=mlp",
        "model.hidden=[16]", "model.activation=tanh", "train.epochs=3", "train.batch_size=32",
        "train.lr=0.01", "train.prior_std=1.0", "train.eval_every=0",
        "ensemble.execution=vmap"]


def make(method, *extra):
    return build_run(load_config(None, [*BASE, f"method.name={method}", *extra]))


# ----------------------------------------------------------------------------- SWAG
def empty_swag(m, d, k):
    z = torch.zeros(m, d, dtype=torch.float64)
    return SWAGState(z, z.clone(), torch.zeros(m, k, d, dtype=torch.float64),
                     torch.zeros(m, dtype=torch.int64))


def test_swag_moments_are_those_of_the_collected_iterates():
    thetas = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state = empty_swag(2, 3, 3)
    for theta in thetas:
        state = swag_collect(state, theta)
    torch.testing.assert_close(state.mean, thetas.mean(0))
    torch.testing.assert_close(state.sq_mean, thetas.square().mean(0))
    torch.testing.assert_close(state.sq_mean - state.mean.square(), thetas.var(0, correction=0))
    assert state.count.tolist() == [5, 5]
    for i in (2, 3, 4):  # the last K = 3 deviations θ_i − θ̄_i, in ring slot i mod 3
        torch.testing.assert_close(state.dev[:, i % 3], thetas[i] - thetas[: i + 1].mean(0))


@pytest.mark.parametrize("count", [3, 2])
def test_swag_draws_have_the_swag_covariance(count):
    mean = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    var = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)
    dev = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [9.0, 9.0, 9.0]]],
                       dtype=torch.float64)  # with count = 2 the third row is never used
    state = SWAGState(mean, mean.square() + var, dev, torch.tensor([count]))
    draws = swag_sample(state, 200_000, torch.Generator().manual_seed(1), scale=0.5)[:, 0]
    k = min(count, 3)
    d = dev[0, :k]
    expected = 0.5 * (torch.diag(var[0]) / 2 + d.T @ d / (2 * (k - 1)))
    standard_error = (expected.diagonal() / len(draws)).sqrt()
    assert ((draws.mean(0) - mean[0]).abs() < 4 * standard_error).all()
    torch.testing.assert_close(torch.cov(draws.T), expected, atol=0.02, rtol=0.03)


def test_swag_diagonal_draws_have_the_diagonal_variance():
    mean = torch.tensor([[0.0, 3.0]], dtype=torch.float64)
    var = torch.tensor([[0.25, 4.0]], dtype=torch.float64)
    state = SWAGState(mean, mean.square() + var, torch.zeros(1, 0, 2, dtype=torch.float64),
                      torch.tensor([4]))
    draws = swag_sample(state, 100_000, torch.Generator().manual_seed(2))[:, 0]
    torch.testing.assert_close(torch.cov(draws.T), torch.diag(var[0]), atol=0.02, rtol=0.03)


def test_swag_in_a_run_collects_the_iterates_of_the_due_steps(tmp_path):
    run = make("swag", "ensemble.members=2", "method.swa_frequency=2", "method.rank=4",
               "method.predict_samples=3")
    seen = []

    def record(step):  # the iterate of step index i is the weights after i optimizer steps
        if step / run.total_steps >= 0.5 and step % 2 == 0 and step < run.total_steps:
            seen.append(torch.cat([p.detach().reshape(2, -1) for p in run.ensemble.params.values()],
                                  dim=1))

    train(run, tmp_path, show_progress=False, on_step=record)
    thetas = torch.stack(seen)
    assert len(seen) == 6  # steps 12, 14, ..., 22 of 24
    buffers = run.state
    torch.testing.assert_close(buffers["swag_mean"], thetas.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(buffers["swag_sq_mean"], thetas.square().mean(0), atol=1e-6,
                               rtol=1e-5)
    assert buffers["swag_count"].tolist() == [6, 6]
    assert run.samples.count == 6 and run.samples.member.tolist() == [0, 1, 0, 1, 0, 1]


def test_swag_that_never_collects_says_so(tmp_path):
    run = make("swag", "ensemble.members=1", "method.swa_start=0.99")
    with pytest.raises(UserError, match="no iterate was collected"):
        train(run, tmp_path, show_progress=False)


@pytest.mark.parametrize(("key", "value"), [("swa_start", 1.0), ("rank", 1), ("scale", 0.0),
                                            ("swa_frequency", 0), ("predict_samples", 0)])
def test_bad_swag_options(key, value):
    with pytest.raises(UserError, match=key):
        make("swag", f"method.{key}={value}")


# ---------------------------------------------------------------------------- SGHMC
def test_sghmc_samples_a_gaussian_with_its_mean_and_covariance():
    mu = torch.tensor([1.0, -1.0], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
    precision = torch.linalg.inv(cov)
    chains, lr, friction = 2000, 0.01, 0.1
    g = torch.Generator().manual_seed(0)
    theta = torch.zeros(chains, 2, dtype=torch.float64)
    v = torch.zeros_like(theta)
    kept = []
    for t in range(3000):  # U(θ) = ½ (θ − μ)ᵀ Σ⁻¹ (θ − μ), N = 1, T = 1
        noise = math.sqrt(2 * friction * lr) * torch.randn(chains, 2, generator=g,
                                                          dtype=torch.float64)
        theta, v = sghmc_step(theta, v, (theta - mu) @ precision, lr, friction, noise)
        if t >= 1000 and t % 50 == 0:
            kept.append(theta)
    x = torch.cat(kept)
    torch.testing.assert_close(x.mean(0), mu, atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.06, rtol=0.04)


def test_cyclical_step_size_follows_the_cosine_cycles():
    assert step_size(0.3, 0.7, 0) == (0.3, 0.7, 0)
    assert step_size(1.0, 0.0, 2) == (1.0, 0.0, 0)
    lr, r, c = step_size(1.0, 0.25, 2)
    assert (lr, r, c) == (pytest.approx(0.5), pytest.approx(0.5), 0)
    lr, r, c = step_size(2.0, 0.875, 2)  # cycle 1, three quarters in: cos(3π/4) = −√2/2
    assert (lr, r, c) == (pytest.approx(1.0 - math.sqrt(0.5)), pytest.approx(0.75), 1)


def test_spread_samples_sit_at_the_middle_of_equal_parts_of_the_sampling_stage():
    kept, steps = 0, []
    for i in range(100):
        if sample_due(i / 100, i, kept, 4, 0.5, 0) is not None:
            kept += 1
            steps.append(i)
    assert steps == [57, 69, 82, 94]  # first r ≥ 0.5 + 0.5·(j + ½)/4
    assert [sample_due(0.6, i, 5, 4, 0.5, 3) for i in (3, 4)] == [1, None]  # ring of 4


def test_sghmc_run_keeps_the_weights_of_the_due_steps_per_cycle(tmp_path):
    run = make("sghmc", "ensemble.members=2", "method.cycles=2", "method.predict_samples=4",
               "method.burn_in=0.5")
    seen = {}

    def record(step):  # the sample of step index i is θ after that step's move
        if step - 1 in (8, 11, 20, 23):
            seen[step - 1] = torch.cat([p.detach().reshape(2, -1)
                                        for p in run.ensemble.params.values()], dim=1)

    train(run, tmp_path, show_progress=False, on_step=record)
    assert run.state["sghmc_count"].tolist() == [[2, 2], [2, 2]]
    kept = run.state["sghmc_samples"]
    for slot, index in enumerate((8, 11, 20, 23)):  # r = 8/12, 11/12 in each 12-step cycle
        torch.testing.assert_close(kept[:, slot], seen[index])
    assert run.samples.count == 8


def test_sghmc_update_is_the_same_under_vmap_and_loop():
    out = []
    for execution in ("vmap", "loop"):
        run = make("sghmc", "ensemble.members=3", f"ensemble.execution={execution}")
        x, y = run.dataset.x_train[:32], run.dataset.y_train[:32]
        torch.manual_seed(0)
        state = run.method.init_state(run.ensemble)
        run.update(Step(run.ensemble.train(), x, y, run.likelihood, 256, 1.0, 0.9, 5,
                        state=state))
        out.append({**run.ensemble.state_tensors(), **state})
    for k in out[0]:
        torch.testing.assert_close(out[0][k], out[1][k], atol=1e-6, rtol=1e-5)
    assert out[0]["sghmc_momentum"].abs().sum() > 0


def test_sghmc_refuses_weight_decay_and_short_runs(tmp_path):
    with pytest.raises(UserError, match="weight_decay = 0.01: must be 0"):
        make("sghmc", "train.prior_std=0", "train.weight_decay=0.01")
    with pytest.raises(UserError, match="multiple of cycles"):
        SGHMCConfig(cycles=3, predict_samples=4)
    run = make("sghmc", "ensemble.members=1", "method.predict_samples=20")
    with pytest.raises(UserError, match="sghmc kept 11 samples in cycle 0"):
        train(run, tmp_path, show_progress=False)


# ------------------------------------------------------------------------------- VI
def test_vi_gradient_is_the_gradient_of_the_negative_elbo():
    run = make("vi", "ensemble.members=2", "ensemble.execution=loop", "model.hidden=[8]",
               "method.init_rho=-3", "method.kl_weight=0.5", "method.prior_std=0.7")
    ens = run.ensemble.train()
    x, y = run.dataset.x_train[:16], run.dataset.y_train[:16]
    torch.manual_seed(3)
    result = run.update(Step(ens, x, y, run.likelihood, 256, 1.0, 0.0))

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in ens.params.items()}
    torch.manual_seed(3)  # the loop draws member 0's noise (fc1, then out), then member 1's
    total = 0.0
    for m in range(2):
        h = x.flatten(1)
        for layer in ("fc1", "out"):
            mu, sd = leaves[f"{layer}.weight_mu"][m], F.softplus(leaves[f"{layer}.weight_rho"][m])
            b_mu, b_sd = leaves[f"{layer}.bias_mu"][m], F.softplus(leaves[f"{layer}.bias_rho"][m])
            mean = h @ mu.T + b_mu
            var = h.square() @ sd.square().T + b_sd.square()
            h = mean + torch.sqrt(var + 1e-12) * torch.randn_like(mean)
            if layer == "fc1":
                h = torch.tanh(h)
        kl = sum(kl_divergence(Normal(leaves[f"{p}_mu"][m], F.softplus(leaves[f"{p}_rho"][m])),
                               Normal(0.0, 0.7)).sum()
                 for p in ("fc1.weight", "fc1.bias", "out.weight", "out.bias"))
        loss = F.cross_entropy(h, y) + 0.5 * kl / 256
        torch.testing.assert_close(result.loss[m], loss.detach(), atol=1e-5, rtol=1e-5)
        total = total + loss
    grads = torch.autograd.grad(total, list(leaves.values()))
    for (k, _), g in zip(leaves.items(), grads, strict=True):
        torch.testing.assert_close(result.grads[k], g, atol=1e-5, rtol=1e-4)


def test_vi_weight_samples_are_draws_of_q_under_the_plain_names(tmp_path):
    run = make("vi", "ensemble.members=2", "method.predict_samples=3", "method.init_rho=-2")
    train(run, tmp_path, show_progress=False)
    names = [n for n, _ in MLP((1, 8, 8), 10, (16,), "tanh").named_parameters()]
    assert list(run.samples.params) == names and run.samples.count == 6
    mu = run.ensemble.params["fc1.weight_mu"].detach()
    sigma = F.softplus(run.ensemble.params["fc1.weight_rho"].detach())
    z = (run.samples.params["fc1.weight"].reshape(3, 2, 16, 64) - mu) / sigma  # draw-major
    assert abs(float(z.mean())) < 0.05 and float(z.std()) == pytest.approx(1.0, abs=0.05)


# ----------------------------------------------------------------------- MC dropout
def test_dropout_targets_name_the_linear_layer_each_dropout_feeds():
    mlp = MLP((1, 8, 8), 10, (16, 8), dropout=0.2)
    assert [tuple(t) for t in dropout_targets(mlp)] == [("drop1", 0.2, "fc2"),
                                                        ("drop2", 0.2, "out")]
    lenet = LeNet5((1, 28, 28), 10, dropout=0.3)
    assert [t.linear for t in dropout_targets(lenet)] == ["classifier.fc1", "classifier.fc2",
                                                          "classifier.fc3"]
    with pytest.raises(UserError, match="no dropout layers; set \\[model\\] dropout > 0"):
        dropout_targets(MLP((1, 8, 8), 10, (16,)))
    bad = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UserError, match="'1' does not feed a Linear"):
        dropout_targets(bad)


def test_masked_weights_compute_the_dropout_forward_with_the_same_mask():
    torch.manual_seed(0)
    mlp = MLP((6,), 3, (5,), dropout=0.4).eval()
    params = {k: v.detach().unsqueeze(0).repeat(2, *[1] * v.dim())
              for k, v in mlp.named_parameters()}
    out = masked_weights(params, dropout_targets(mlp), torch.Generator().manual_seed(7))
    keep = (torch.rand(2, 5, generator=torch.Generator().manual_seed(7)) >= 0.4).float()
    torch.testing.assert_close(out["out.weight"], params["out.weight"] * keep[:, None] / 0.6)
    torch.testing.assert_close(out["fc1.weight"], params["fc1.weight"])
    x = torch.randn(4, 6)
    by_hand = F.linear(torch.relu(mlp.fc1(x)) * keep[1] / 0.6, mlp.out.weight, mlp.out.bias)
    masked = functional_call(mlp, {k: v[1] for k, v in out.items()}, (x,))
    torch.testing.assert_close(masked, by_hand)


def test_mc_dropout_draws_differ_and_predictions_are_seeded(tmp_path):
    module = to_mc_dropout(MLP((1, 8, 8), 10, (16,), dropout=0.3)).eval()
    assert isinstance(module.drop1, MCDropout)
    x = torch.randn(5, 1, 8, 8)
    assert not torch.equal(module(x), module(x))  # stays stochastic in eval mode
    run = make("mc-dropout", "model.dropout=0.3", "ensemble.members=2",
               "method.predict_samples=3")
    forward = [predict(run.ensemble, run.likelihood, run.dataset.x_test, samples=3)["probs"]
               for _ in range(2)]
    assert forward[0].shape == (6, 100, 10) and torch.equal(forward[0], forward[1])
    assert (forward[0][0] - forward[0][2]).abs().max() > 1e-3  # member 0, draws 0 and 1
    train(run, tmp_path, show_progress=False)
    probs = [predict_run(run, run.dataset.x_test)["probs"] for _ in range(2)]
    assert torch.equal(probs[0], probs[1]) and (probs[0][0] - probs[0][2]).abs().max() > 1e-3


# -------------------------------------------------------------------------- Laplace
def ggn_diagonal(model, x):
    """Closed-form GGN diagonal of softmax regression: Σ_n x²_nd p_nc(1 − p_nc), and the bias."""
    with torch.no_grad():
        p = model(x).softmax(-1).double()
    lam = p * (1 - p)  # (N, C)
    xf = x.flatten(1).double()
    return torch.cat([(lam.T @ xf.square()).flatten(), lam.sum(0)])


def test_last_layer_diagonal_laplace_matches_the_closed_form_ggn():
    data = load_dataset(DataConfig(name="digits", train_subset=256))
    torch.manual_seed(0)
    model = LinearModel((1, 8, 8), 10)
    with torch.no_grad():
        model.fc.weight.mul_(3.0)  # confident predictions: a spread of GGN entries
    x, y = data.x_train, data.y_train
    cfg = LaplaceConfig(subset_of_weights="last_layer", hessian_structure="diag")
    la = fit_laplace(model, DataLoader(TensorDataset(x, y), batch_size=cfg.fit_batch_size), cfg,
                     prior_precision=1.0)
    h = ggn_diagonal(model, x)
    tau = float(la.prior_precision)
    torch.testing.assert_close(la.posterior_variance.double(), 1 / (h + tau), rtol=1e-4,
                               atol=0)
    theta = torch.cat([model.fc.weight.flatten(), model.fc.bias]).detach().double()

    def dlogml(t):  # d/dτ of the Laplace log marginal likelihood (diagonal, prior mean 0)
        return float(len(h) / t - (1 / (h + t)).sum() - theta.square().sum())

    assert tau == pytest.approx(brentq(dlogml, 1e-3, 1e3), rel=0.02)
    names = random_names(model, "last_layer")
    assert names == ["fc.weight", "fc.bias"]
    draws = unflatten_draws(la.sample(20_000, generator=torch.Generator().manual_seed(0)),
                            model, names)
    weights = torch.cat([d["fc.weight"] for d in draws]).double()
    torch.testing.assert_close(weights.var(0), (1 / (h[:640] + tau)).reshape(10, 64),
                               rtol=0.06, atol=0)


def test_laplace_samples_move_only_the_last_layer_and_all_weights_move_all(tmp_path):
    for subset, moving in (("last_layer", {"out.weight", "out.bias"}),
                           ("all", {"fc1.weight", "fc1.bias", "out.weight", "out.bias"})):
        run = make("laplace", "ensemble.members=2", f"method.subset_of_weights={subset}",
                   "method.hessian_structure=diag", "method.predict_samples=3",
                   "method.marglik_steps=10")
        train(run, tmp_path / subset, show_progress=False)
        samples = run.samples
        assert samples.count == 6 and samples.member.tolist() == [0, 1, 0, 1, 0, 1]
        for name, p in run.ensemble.params.items():
            spread = (samples.params[name].reshape(3, 2, -1) - p.detach().reshape(1, 2, -1))
            assert (spread.abs().max() > 0) == (name in moving), (subset, name)


def test_laplace_refuses_regression_data():
    with pytest.raises(UserError, match="laplace needs classification data"):
        build_run(load_config(None, ["data.name=regression-1d", "likelihood.name=gaussian",
                                     "method.name=laplace",
                                     "model.name=mlp", "model.hidden=[8]"]))
