"""One table every training method must pass: it learns, it is deterministic under a
seed, vmap equals loop, and an interrupted run resumes to the same parameters."""

import pytest
import torch

from diverse.app.config import load_config
from diverse.app.train import build_run, train
from diverse.errors import UserError
from diverse.math.annealing import anneal
from diverse.methods.base import Step
from diverse.methods.catalog import METHODS
from method_table import ROWS

#: the CLI overrides of every method, from the one method table (tests/method_table.py)
METHOD_SETTINGS = {name: list(row.cli) for name, row in ROWS.items()}
BASE = ["data.name=digits", "data.train_subset=256", "data.test_subset=200",
        "model.name=mlp", "model.hidden=[16]", "model.activation=tanh", "ensemble.members=3",
        "train.epochs=3", "train.batch_size=32", "train.lr=0.01", "train.prior_std=1.0",
        "train.eval_every=0"]


def make(method, *extra):
    return build_run(load_config(None, [*BASE, f"method.name={method}",
                                        *METHOD_SETTINGS[method], *extra]))


def test_every_registered_method_is_in_the_table():
    assert set(METHODS) == set(METHOD_SETTINGS)


@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_vmap_and_loop_give_the_same_update(method):
    results = []
    for execution in ("vmap", "loop"):
        run = make(method, f"ensemble.execution={execution}")
        x, y = run.dataset.x_train[:32], run.dataset.y_train[:32]
        torch.manual_seed(0)
        step = Step(run.ensemble.train(), x, y, run.likelihood, 256, 1.0, 0.3,
                    state=run.method.init_state(run.ensemble))
        result = run.update(step)
        # a sampler moves θ itself (grads None): compare where it moved them
        moved = result.grads if result.grads is not None else {
            k: v.detach().clone() for k, v in run.ensemble.params.items()}
        results.append((result, moved))
    for k in results[0][1]:
        a, b = results[0][1][k], results[1][1][k]
        scale = max(1e-3, b.abs().max().item())
        torch.testing.assert_close(a / scale, b / scale, atol=2e-5, rtol=1e-4)
    assert set(results[0][0].logs) == set(results[1][0].logs)


@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_method_learns_is_deterministic_and_resumes_exactly(tmp_path, method):
    # a fixed execution: two separate "auto" runs may time differently and pick differently
    full = make(method, "ensemble.execution=vmap")
    history = train(full, tmp_path / "full", show_progress=False)
    assert history[-1]["test_accuracy"] > 0.5  # digits, 256 examples, 24 steps of 3 members
    again = make(method, "ensemble.execution=vmap")

    def crash(step):
        if step == full.steps_per_epoch + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(again, tmp_path / "cut", show_progress=False, on_step=crash)
    resumed = make(method, "ensemble.execution=loop")  # the run's own choice is restored
    train(resumed, tmp_path / "cut", resume=True, show_progress=False)
    for k, v in full.ensemble.state_tensors().items():
        assert torch.equal(v, resumed.ensemble.state_tensors()[k]), k
    assert set(full.state) == set(resumed.state)
    for k, v in full.state.items():  # the method's state (SWAG moments, chains) too
        assert torch.equal(v, resumed.state[k]), k
    if "diag_driving_norm" in history[-1]:  # particle methods report both terms
        diag = history[-1]
        assert diag["diag_driving_norm"] > 0 and diag["diag_repulsion_norm"] > 0
        assert diag["diag_driving_over_repulsion"] == pytest.approx(
            diag["diag_driving_norm"] / diag["diag_repulsion_norm"], rel=0.5)


def test_repulsion_scale_batch_vs_n_changes_the_repulsion_by_n_over_b():
    logs = {}
    for scale in ("n", "batch"):
        run = make("wgd", f"method.repulsion_scale={scale}", "method.estimator=kde")
        x, y = run.dataset.x_train[:32], run.dataset.y_train[:32]
        result = run.update(Step(run.ensemble, x, y, run.likelihood, 256, 1.0, 0.0))
        logs[scale] = {k: float(v) for k, v in result.logs.items()}  # 0-dim tensors
    assert logs["batch"]["repulsion_norm"] == pytest.approx(
        logs["n"]["repulsion_norm"] * 256 / 32, rel=1e-5)
    assert logs["batch"]["driving_norm"] == pytest.approx(logs["n"]["driving_norm"], rel=1e-6)


def test_annealing_schedules():
    assert anneal("constant", 0.3) == 1.0
    assert anneal("linear", 0.25) == 0.25
    assert anneal("hyper", 0.1) < 1e-6 and anneal("hyper", 1.0) == pytest.approx(1.0, abs=1e-3)
    assert anneal("cyclic", 0.0, cycles=4) == 0.0
    assert anneal("cyclic", 0.125, cycles=4) == pytest.approx(0.5)
    with pytest.raises(UserError, match="'exp'"):
        anneal("exp", 0.5)


@pytest.mark.parametrize(("override", "message"), [
    ("method.estimator=magic", "estimator = 'magic': allowed kde, sge, ssge"),
    ("method.kernel=poly", "kernel = 'poly': allowed rbf, laplace, imq"),
    ("method.annealing=step", "annealing = 'step'"),
    ("method.repulsion_scale=m", "repulsion_scale = 'm'"),
])
def test_bad_method_options(override, message):
    with pytest.raises(UserError, match=message):
        make("wgd", override)
