"""HE-CKA ensembles, SVGD-CKA and the hypernetwork method against hand computations."""

import pytest
import torch

from diverse.app.config import load_config
from diverse.app.train import build_run, predict_run
from diverse.errors import UserError
from diverse.math import he_cka as he
from diverse.math.cka import unit_grams
from diverse.methods.base import Step
from diverse.methods.feature_repulsion import HECKAConfig, energy_matrix, mean_softmax_entropy
from diverse.nets.ensemble import flatten_params

BASE = ["data.name=digits", "data.train_subset=256", "data.test_subset=100",
        "model.name=mlp", "model.hidden=[16, 12]", "model.activation=tanh",
        "ensemble.members=3", "ensemble.execution=loop", "train.epochs=1",
        "train.batch_size=32", "train.prior_std=1.0"]


def make(*extra, base=BASE):
    return build_run(load_config(None, [*base, *extra]))


IMAGES = [b for b in BASE if not b.startswith(("model.", "data.name"))]


def step_of(run, index=100):
    x, y = run.dataset.x_train[:32], run.dataset.y_train[:32]
    return Step(run.ensemble.train(), x, y, run.likelihood, 256, 1.0, 0.5, index)


def grads_of(run, step):
    torch.manual_seed(0)
    return run.update(step)


def test_he_cka_with_gamma_zero_is_the_deep_ensemble():
    de, hc = make("method.name=de"), make("method.name=he-cka", "method.gamma=0")
    a, b = grads_of(de, step_of(de)), grads_of(hc, step_of(hc))
    for k in a.grads:
        torch.testing.assert_close(a.grads[k], b.grads[k], rtol=1e-6, atol=1e-7)


def test_he_cka_gradient_is_that_of_the_documented_objective():
    run = make("method.name=he-cka", "method.gamma=0.7", "method.warmup_steps=400",
               "method.kernel=linear")
    step = step_of(run, index=100)  # warm-up weight 100/400
    result = grads_of(run, step)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in run.ensemble.params.items()}
    layers = ("act1", "act2")
    out, feats = run.ensemble.features(step.x, layers, params=params)
    feats = {**feats, "output": out}
    weights = he.layer_weights(3, "first-middle-last")  # [0, .5, 6.5] / 7
    assert weights == pytest.approx([0.0, 0.5 / 7, 6.5 / 7])
    energy = sum(w * he.he_cka(f, kernel="linear", eps=0.0025, eps_arc=0.065)
                 for w, f in zip(weights, feats.values(), strict=True))
    nll = torch.nn.functional.cross_entropy(out.flatten(0, 1), step.y.repeat(3),
                                            reduction="none").view(3, -1).mean(1)
    prior = sum(v.flatten(1).square().sum(1) for v in params.values()) / (2 * 256)
    objective = (nll + prior).sum() + 3 * 0.25 * 0.7 * energy
    expected = torch.autograd.grad(objective, list(params.values()))
    for (k, g), e in zip(result.grads.items(), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=k)
    assert result.logs["warmup"] == 0.25
    assert float(result.logs["he_cka"]) == pytest.approx(float(energy.detach()), rel=1e-5)


def test_svgd_cka_update_matches_a_per_pair_computation():
    run = make("method.name=svgd-cka", "method.gamma=2.0", "method.warmup_steps=0")
    step = step_of(run)
    result = grads_of(run, step)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in run.ensemble.params.items()}
    out, feats = run.ensemble.features(step.x, ("act1", "act2"), params=params)
    feats = {**feats, "output": out}
    cfg = HECKAConfig(eps=5e-5, eps_arc=0.165)
    weights = he.layer_weights(3, "first-middle-last")
    # K_mn computed pair by pair, with member n's Gram held constant
    units = {k: unit_grams(f.flatten(2), "cosine") for k, f in feats.items()}
    m = 3
    k_rows = []
    for a in range(m):
        row = []
        for b in range(m):
            e = 0.0
            for w, u in zip(weights, units.values(), strict=True):
                theta = torch.arccos(((u[a] @ u[b].detach()) / 1.165).clamp(-1, 1))
                e = e + w * (1 + 5e-5) / (theta**2 + 5e-5)
            row.append(e)
        k_rows.append(torch.stack(row))
    kmat = torch.stack(k_rows)
    torch.testing.assert_close(kmat, energy_matrix(feats, weights, cfg), rtol=1e-5, atol=1e-6)
    nll = torch.nn.functional.cross_entropy(out.flatten(0, 1), step.y.repeat(3),
                                            reduction="none").view(3, -1).mean(1)
    prior = sum(v.flatten(1).square().sum(1) for v in params.values()) / (2 * 256)
    names = list(params)
    drive = -flatten_params(dict(zip(names, torch.autograd.grad(
        (nll + prior).sum(), list(params.values()), retain_graph=True), strict=True)))
    repulsion = flatten_params(dict(zip(names, torch.autograd.grad(
        kmat.sum(), list(params.values())), strict=True)))
    phi = (kmat.detach().T @ drive) / m - 2.0 * repulsion / m
    scale = phi.abs().max()
    # float32 on both sides, summed in other orders through arccos near ±1: a few
    # entries differ by ~2e-6 of the largest on some CPUs
    torch.testing.assert_close(-flatten_params(result.grads) / scale, phi / scale, rtol=1e-4,
                               atol=1e-5)
    assert result.logs["repulsion_norm"] > 0


def test_energy_kernel_is_largest_on_the_diagonal():
    torch.manual_seed(1)
    feats = {"a": torch.randn(4, 16, 8)}
    k = energy_matrix(feats, [1.0], HECKAConfig(eps=5e-5, eps_arc=0.165))
    off = k[~torch.eye(4, dtype=torch.bool)]
    assert (k.diagonal()[:, None] > k).sum() == 12 and off.min() > 0


def test_mean_softmax_entropy_closed_form():
    # two members, one-hot on different classes: mean = (1/2, 1/2, 0) → entropy ln 2
    logits = torch.tensor([[[30.0, 0.0, 0.0]], [[0.0, 30.0, 0.0]]])
    assert float(mean_softmax_entropy(logits)) == pytest.approx(float(torch.log(torch.tensor(2.))),
                                                               abs=1e-6)


def test_outliers_enter_the_objective_and_are_repeatable():
    extra = ["data.name=fashion-mnist", "model.name=lenet5", "method.name=he-cka",
             "method.outliers=16", "method.outlier_pool=64", "ensemble.members=2"]
    run = make(*extra, base=IMAGES)
    step = step_of(run)
    first, second = grads_of(run, step), grads_of(run, step)
    assert first.logs["outlier_entropy"] > 0 and first.logs["he_cka_ood"] > 0
    for k in first.grads:
        assert torch.equal(first.grads[k], second.grads[k])
    plain = make(*extra[:-3], "method.outliers=0", "ensemble.members=2", base=IMAGES)
    assert "outlier_entropy" not in grads_of(plain, step_of(plain)).logs


def test_outliers_need_images():
    with pytest.raises(UserError, match="synthetic outliers need image data"):
        make("data.name=blobs", "method.name=he-cka", "method.outliers=8")


def test_unknown_feature_layer_is_named():
    run = make("method.name=he-cka", "method.layers=[\"act9\"]")
    with pytest.raises(UserError, match="'act9' is not a module"):
        run.update(step_of(run))


def test_hypernetwork_predicts_with_its_own_number_of_members():
    run = make("method.name=hyper-he-cka", "method.predict_members=7", "ensemble.members=3")
    assert run.ensemble.members == 1  # one slot: the hypernetwork
    result = grads_of(run, step_of(run))
    assert result.outputs.shape == (3, 32, 10)  # three generated networks per step
    assert all(g.abs().sum() > 0 for g in result.grads.values())
    pred = predict_run(run, run.dataset.x_test)["probs"]
    assert pred.shape == (7, 100, 10)
    torch.testing.assert_close(pred, predict_run(run, run.dataset.x_test)["probs"])


def test_mutual_bnn_predicts_monte_carlo_draws_of_every_peer():
    run = make("method.name=mutual-bnn", "method.predict_samples=4", "ensemble.members=2")
    pred = predict_run(run, run.dataset.x_test)["probs"]
    assert pred.shape == (8, 100, 10)
    assert not torch.allclose(pred[0], pred[2])  # two draws of peer 0 differ
    torch.testing.assert_close(pred, predict_run(run, run.dataset.x_test)["probs"])  # seeded


@pytest.mark.parametrize("key", ["spread=0.2", "z_dim=8", "predict_members=4"])
def test_hypernetwork_keys_belong_to_hyper_he_cka_only(key):
    name = key.split("=")[0]
    for method in ("he-cka", "svgd-cka"):
        with pytest.raises(UserError, match=f"unknown key \\[method\\] '{name}'"):
            make(f"method.name={method}", f"method.{key}")
    assert make("method.name=hyper-he-cka", f"method.{key}").ensemble.members == 1


@pytest.mark.parametrize(("key", "message"), [
    ("spread=0", "spread = 0.0: must be in \\(0, 1\\]"),
    ("code_dim=1", "code_dim = 1: must be an integer >= 2"),
    ("predict_members=0", "predict_members = 0: must be an integer >= 1"),
])
def test_hypernetwork_keys_are_checked(key, message):
    with pytest.raises(UserError, match=message):
        make("method.name=hyper-he-cka", f"method.{key}")


def test_a_trained_hypernetwork_evaluates_with_any_number_of_members(tmp_path):
    import json

    import numpy as np

    from diverse import metrics
    from diverse.app.cli import main
    from diverse.app.config import replace
    from diverse.app.train import load_trained

    run_dir = tmp_path / "hyper"
    sets = [s for b in BASE for s in ("--set", b)]
    args = [*sets, "--set", "method.name=hyper-he-cka", "--set", "method.predict_members=3",
            "--set", 'data.ood=["uniform"]']
    (tmp_path / "c.toml").write_text("")
    assert main(["train", str(tmp_path / "c.toml"), *args, "--out", str(run_dir),
                 "--quiet"]) == 0
    cfg = load_config(run_dir / "config.toml")
    trained = load_trained(run_dir, cfg)
    three = predict_run(trained, trained.dataset.x_test)
    assert three["probs"].shape == (3, 100, 10)
    # the checkpoint holds the generator only: any K loads
    five = load_trained(run_dir, replace(cfg, "method", predict_members=5))
    assert five.ensemble.module.predict_codes.shape == (5, 32)
    assert main(["evaluate", str(run_dir), "--predict-members", "6", "--quiet"]) == 0
    with np.load(run_dir / "predictions.npz", allow_pickle=False) as npz:
        probs, labels = torch.from_numpy(npz["probs"]), torch.from_numpy(npz["labels"])
    assert probs.shape == (6, 100, 10)
    assert load_config(run_dir / "config.toml").method.predict_members == 6
    figures = json.loads((run_dir / "metrics.json").read_text())
    assert figures["accuracy"] == pytest.approx(float(metrics.accuracy(probs, labels)))
    # the generated networks are the trained ones: K = 3 again predicts as before
    assert main(["evaluate", str(run_dir), "--predict-members", "3", "--quiet"]) == 0
    with np.load(run_dir / "predictions.npz", allow_pickle=False) as npz:
        np.testing.assert_allclose(npz["probs"], three["probs"].numpy(), rtol=1e-5, atol=1e-6)
    assert main(["evaluate", str(run_dir), "--predict-members", "0"]) == 2


def test_predict_members_is_refused_for_runs_that_do_not_generate_members(tmp_path, capsys):
    from diverse.app.cli import main

    run_dir = tmp_path / "de"
    sets = [s for b in BASE for s in ("--set", b)]
    (tmp_path / "c.toml").write_text("")
    assert main(["train", str(tmp_path / "c.toml"), *sets, "--set", "data.ood=[]",
                 "--out", str(run_dir), "--quiet"]) == 0
    before = (run_dir / "config.toml").read_text()
    assert main(["evaluate", str(run_dir), "--predict-members", "4"]) == 2
    assert "only hyper-he-cka runs generate their members" in capsys.readouterr().err
    assert (run_dir / "config.toml").read_text() == before
