"""Full-batch HMC (diverse.methods.hmc) and the chain diagnostics (diverse.math.mcmc)."""

import numpy as np
import pytest
import torch
from test_particles import NOISE, PRIOR, linear_regression, particle_weights

from diverse.app.config import load_config
from diverse.app.train import build_run, train
from diverse.errors import UserError
from diverse.math.mcmc import effective_sample_size, split_rhat
from diverse.nets.samples import base_model, flatten


def hmc_run(data, steps, members=8, extra=()):
    cfg = load_config(None, [
        "method.name=hmc", "model.name=linear", "likelihood.name=gaussian",
        f"likelihood.noise_std={NOISE}", f"train.prior_std={PRIOR}", f"ensemble.members={members}",
        "ensemble.execution=vmap", f"train.steps={steps}", f"train.batch_size={len(data.x_train)}",
        "train.eval_every=0", *extra])
    return build_run(cfg, data)


def test_hmc_reproduces_the_closed_form_bayesian_linear_regression_posterior(tmp_path):
    data, mean, cov = linear_regression()
    run = hmc_run(data, steps=700, extra=("method.leapfrog_steps=8", "method.step_size=0.05",
                                          "method.predict_samples=300", "method.warmup=0.5",
                                          "train.checkpoint_every=700"))
    train(run, tmp_path / "run", show_progress=False)
    samples = run.samples
    assert samples.count == 8 * 300 and samples.members == 8
    skeleton = base_model(run.cfg, data, run.likelihood)
    w = flatten(samples, skeleton).double()  # (S, D): fc.weight then fc.bias, as `mean`
    sd = cov.diagonal().sqrt()
    assert ((w.mean(0) - mean).abs() / sd).max() < 0.05
    ratio = w.var(0) / cov.diagonal()
    assert 0.9 <= float(ratio.min()) and float(ratio.max()) <= 1.1
    # every chain moved and the chains agree on the weights (a unimodal posterior)
    chains = w.reshape(300, 8, -1).transpose(0, 1)  # (chains, draws, D)
    assert float(split_rhat(chains).max()) < 1.05
    assert float(effective_sample_size(chains).min()) > 300


def test_hmc_resumes_bit_for_bit(tmp_path):
    data, _mean, _cov = linear_regression()
    extra = ("method.leapfrog_steps=4", "method.predict_samples=5", "train.checkpoint_every=1")
    full = hmc_run(data, steps=30, members=3, extra=extra)
    train(full, tmp_path / "full", show_progress=False)

    class Stop(Exception):
        pass

    def stop_at(step):
        if step == 17:
            raise Stop

    broken = hmc_run(data, steps=30, members=3, extra=extra)
    with pytest.raises(Stop):
        train(broken, tmp_path / "resumed", show_progress=False, on_step=stop_at)
    resumed = hmc_run(data, steps=30, members=3, extra=extra)
    train(resumed, tmp_path / "resumed", resume=True, show_progress=False)
    assert torch.equal(particle_weights(full), particle_weights(resumed))
    for name, value in full.state.items():
        assert torch.equal(value, resumed.state[name]), name
    for name in full.samples.params:
        assert torch.equal(full.samples.params[name], resumed.samples.params[name])


@pytest.mark.parametrize(("extra", "message"), [
    (("train.prior_std=0",), "proper Gaussian prior"),
    (("train.prior_std=0", "train.weight_decay=0.01"), "weight_decay = 0.01: must be 0"),
    (("method.target_accept=1.0",), "target_accept = 1.0"),
    (("method.warmup=0",), "warmup = 0"),
])
def test_hmc_bad_settings_are_refused(extra, message):
    data, _mean, _cov = linear_regression()
    with pytest.raises(UserError, match=message):
        hmc_run(data, steps=10, extra=extra)


def test_hmc_with_too_few_sampling_steps_says_so(tmp_path):
    data, _mean, _cov = linear_regression()
    run = hmc_run(data, steps=10, members=2, extra=("method.predict_samples=20",))
    with pytest.raises(UserError, match="hmc kept .* of predict_samples = 20"):
        train(run, tmp_path / "run", show_progress=False)


# ---------------------------------------------------------------------- diagnostics


def test_split_rhat_matches_the_formula_and_flags_disagreeing_chains():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 200, 3, generator=g, dtype=torch.float64)
    # direct: halve each chain, W = mean within variance, B/n = variance of the means
    a = x.numpy()
    halves = np.concatenate([a[:, :100], a[:, 100:]], 0)
    n = halves.shape[1]
    w = halves.var(1, ddof=1).mean(0)
    b_over_n = halves.mean(1).var(0, ddof=1)
    expected = np.sqrt(((n - 1) / n * w + b_over_n) / w)
    np.testing.assert_allclose(split_rhat(x).numpy(), expected, rtol=1e-12)
    assert float((split_rhat(x) - 1).abs().max()) < 0.02
    shifted = x.clone()
    shifted[0] += 2.0
    assert float(split_rhat(shifted).min()) > 1.2
    drift = x + torch.linspace(0, 3, 200, dtype=torch.float64)[None, :, None]  # non-stationary
    assert float(split_rhat(drift).min()) > 1.2


def test_effective_sample_size_of_independent_and_ar1_chains():
    g = torch.Generator().manual_seed(1)
    iid = torch.randn(4, 2000, 2, generator=g, dtype=torch.float64)
    ess = effective_sample_size(iid)
    assert float(ess.min()) > 0.85 * 8000 and float(ess.max()) < 1.15 * 8000
    rho, t = 0.8, 5000
    noise = torch.randn(4, t, generator=g, dtype=torch.float64) * (1 - rho**2) ** 0.5
    chain = torch.zeros(4, t, dtype=torch.float64)
    chain[:, 0] = torch.randn(4, generator=g, dtype=torch.float64)
    for i in range(1, t):
        chain[:, i] = rho * chain[:, i - 1] + noise[:, i]
    expected = 4 * t * (1 - rho) / (1 + rho)  # ESS of an AR(1) process
    assert abs(float(effective_sample_size(chain)) / expected - 1) < 0.15


def test_diagnostics_refuse_short_chains():
    with pytest.raises(ValueError, match="at least 4 draws"):
        split_rhat(torch.zeros(2, 3))
