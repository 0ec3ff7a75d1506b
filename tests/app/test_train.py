"""The training loop: deep-ensemble gradients, determinism, exact resume, divergence."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diverse.app.config import load_config
from diverse.app.train import build_run, train
from diverse.checkpoint import load_checkpoint
from diverse.errors import DivergenceError
from diverse.methods.base import Step

BASE = ["data.name=digits", "data.train_subset=300", "model.name=mlp", "model.hidden=[32]",
        "model.dropout=0.2", "ensemble.members=3", "train.epochs=3", "train.batch_size=64",
        "train.lr=0.01", "train.prior_std=1.0", "train.eval_every=1"]


def make_run(*extra):
    return build_run(load_config(None, [*BASE, *extra]))


def final_state(run):
    return {k: v.detach().clone() for k, v in run.ensemble.state_tensors().items()}


def test_deep_ensemble_gradient_is_each_members_own_log_posterior_gradient():
    run = make_run("model.dropout=0.0")
    ens = run.ensemble.train()
    x, y = run.dataset.x_train[:16], run.dataset.y_train[:16]
    result = run.update(Step(ens, x, y, run.likelihood, n_train=300, prior_std=1.0, progress=0.0))
    for m in range(3):
        member = ens.member(m)
        loss = F.cross_entropy(member(x), y)
        loss = loss + sum(p.square().sum() for p in member.parameters()) / (2 * 1.0**2 * 300)
        loss.backward()
        for name, p in member.named_parameters():
            torch.testing.assert_close(result.grads[name][m], p.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result.loss[m], loss.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("execution", ["vmap", "loop"])
def test_resume_after_interruption_mid_epoch_is_bit_exact(tmp_path, execution):
    full = make_run(f"ensemble.execution={execution}")
    train(full, tmp_path / "full", show_progress=False)
    expected = final_state(full)

    cut = make_run(f"ensemble.execution={execution}")
    steps_per_epoch = cut.steps_per_epoch  # 5 steps of 64

    def crash(step):
        if step == steps_per_epoch + 2:  # in the middle of epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cut, tmp_path / "cut", show_progress=False, on_step=crash)
    assert load_checkpoint(tmp_path / "cut")[2]["epoch"] == 1
    resumed = make_run(f"ensemble.execution={execution}")
    history = train(resumed, tmp_path / "cut", resume=True, show_progress=False)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    got = final_state(resumed)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # optimizer state too
    a, b = load_file(next((tmp_path / "full/checkpoints").glob("epoch-0003.optim.*"))), \
        load_file(next((tmp_path / "cut/checkpoints").glob("epoch-0003.optim.*")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["de", "swag"])
def test_step_checkpoints_resume_mid_epoch_at_the_next_batch(tmp_path, method):
    extra = ["train.checkpoint_every_steps=2", f"method.name={method}",
             *(["method.swa_frequency=1"] if method == "swag" else [])]
    full = make_run(*extra)
    full_history = train(full, tmp_path / "full", show_progress=False)

    def crash(step):
        if step == 8:  # epoch 2 of 5-step epochs, after the step-6 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make_run(*extra), tmp_path / "cut", show_progress=False, on_step=crash)
    manifest = load_checkpoint(tmp_path / "cut")[2]
    assert (manifest["epoch"], manifest["epoch_step"], manifest["step"]) == (1, 1, 6)
    resumed = make_run(*extra)
    history = train(resumed, tmp_path / "cut", resume=True, show_progress=False)
    expected, got = final_state(full), final_state(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in history] == \
        [{k: v for k, v in r.items() if k not in drop} for r in full_history]


def test_same_seed_same_parameters_other_seed_differs(tmp_path):
    runs = [make_run("train.epochs=1"), make_run("train.epochs=1"),
            make_run("train.epochs=1", "train.seed=1")]
    states = []
    for i, run in enumerate(runs):
        train(run, tmp_path / str(i), show_progress=False)
        states.append(final_state(run))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["net.0.weight"] if "net.0.weight" in states[0]
                           else next(iter(states[0].values())),
                           states[2]["net.0.weight"] if "net.0.weight" in states[2]
                           else next(iter(states[2].values())))


def test_training_learns_and_checkpoints_are_stacked(tmp_path):
    run = make_run("train.epochs=4", "model.dropout=0.0")
    history = train(run, tmp_path, show_progress=False)
    assert history[-1]["test_accuracy"] > 0.85  # digits, 300 examples, 4 epochs
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    model, optim, manifest = load_checkpoint(tmp_path)
    assert manifest["epoch"] == 4 and manifest["step"] == 4 * run.steps_per_epoch
    for name, p in run.ensemble.params.items():
        assert model[name].shape == p.shape and model[name].shape[0] == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch-*.json")) == [
        "epoch-0003.json", "epoch-0004.json"]  # keep_checkpoints = 2


@pytest.mark.parametrize("host_reads", [True, False], ids=["cpu-path", "accelerator-path"])
def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(
        tmp_path, monkeypatch, host_reads):
    # the accelerator's path keeps the checks on the device and reads them at sync points
    # (here the epoch's end); HOST_READS_EVERY_STEP = False runs it on the CPU
    from diverse.app import loop

    monkeypatch.setattr(loop, "HOST_READS_EVERY_STEP", host_reads)
    run = make_run()
    update = run.update
    calls = {"n": 0}

    def poisoned(step):
        calls["n"] += 1
        result = update(step)
        if calls["n"] == run.steps_per_epoch + 3:
            result.loss[1] = float("nan")
        return result

    run.update = poisoned
    with pytest.raises(DivergenceError, match=r"epoch 2 step 3 \(global step 8\)"):
        train(run, tmp_path, show_progress=False)
    assert calls["n"] == (run.steps_per_epoch + 3 if host_reads else 2 * run.steps_per_epoch)
    assert load_checkpoint(tmp_path)[2]["epoch"] == 1  # the last good one, never a bad one


def test_accelerator_path_keeps_the_same_history(tmp_path, monkeypatch):
    from diverse.app import loop

    histories = []
    for host in (True, False):
        monkeypatch.setattr(loop, "HOST_READS_EVERY_STEP", host)
        run = make_run("method.name=svgd")
        histories.append(train(run, tmp_path / str(host), show_progress=False))
    for on_host, on_device in zip(*histories, strict=True):
        assert on_host.keys() == on_device.keys()
        for key, value in on_host.items():
            if key != "seconds" and isinstance(value, float):
                assert on_device[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


def test_kill_9_mid_epoch_then_cli_resume_matches_uninterrupted_run(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[data]\nname = "digits"\n[model]\nname = "mlp"\nhidden = [128, 128]\n'
                   '[ensemble]\nmembers = 4\nexecution = "loop"\n'
                   '[train]\nepochs = 30\nbatch_size = 32\nlr = 0.003\neval_every = 0\n')
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "diverse.app.cli"]
    subprocess.run([*cli, "train", str(cfg), "--out", str(tmp_path / "full"), "--quiet"],
                   check=True, env=env, timeout=300)
    proc = subprocess.Popen([*cli, "train", str(cfg), "--out", str(tmp_path / "cut"), "--quiet"],
                            env=env)
    latest = tmp_path / "cut/checkpoints/latest.json"
    deadline = time.time() + 240
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.1)  # inside a later epoch (or while it writes a checkpoint)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut/metrics.json").exists()
    subprocess.run([*cli, "train", "--resume", str(tmp_path / "cut"), "--quiet"],
                   check=True, env=env, timeout=300)
    a = load_checkpoint(tmp_path / "full")[0]
    b = load_checkpoint(tmp_path / "cut")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Path(tmp_path / "cut/metrics.json").exists()


def test_non_finite_update_with_finite_loss_also_stops(tmp_path):
    run = make_run()
    update = run.update

    def poisoned(step):
        result = update(step)
        first = next(iter(result.grads))
        result.grads[first] = result.grads[first].clone().fill_(float("inf"))
        return result

    run.update = poisoned
    with pytest.raises(DivergenceError, match=r"non-finite update \(gradient\) at epoch 1 step 1"):
        train(run, tmp_path, show_progress=False)


def test_repulsion_warning_threshold():
    from diverse.app.train import repulsion_warning

    assert repulsion_warning({"diag_driving_over_repulsion": 999.0}) is None
    assert repulsion_warning({"train_loss": 1.0}) is None  # no interaction term
    message = repulsion_warning({"diag_driving_over_repulsion": 1.5e6})
    assert "1.5e+06x" in message and "repulsion_scale" in message and "driving_scale" in message


def test_weak_repulsion_is_warned_about_in_history_stderr_and_report(tmp_path, capsys):
    import json

    from diverse.app.cli import main

    config = tmp_path / "svgd.toml"
    config.write_text('[data]\nname = "digits"\ntrain_subset = 400\n[model]\nhidden = [16]\n'
                      '[ensemble]\nmembers = 3\n[method]\nname = "svgd"\n'
                      '[train]\nepochs = 1\nprior_std = 1.0\n')
    outcomes = {}
    for name, extra in (("default", []), ("strong", ["--set", "method.repulsion_scale=batch",
                                                     "--set", "method.driving_scale=0.01"])):
        out = tmp_path / name
        assert main(["train", str(config), *extra, "--out", str(out), "--quiet"]) == 0
        manifest = json.loads((out / "checkpoints" / "epoch-0001.json").read_text())
        record = manifest["history"][0]
        outcomes[name] = (record, capsys.readouterr().err, (out / "report.md").read_text())
    record, err, report = outcomes["default"]  # exact-posterior scaling: repulsion invisible
    assert record["diag_driving_over_repulsion"] > 1e3
    assert "driving term is" in record["warning"] and "warning: epoch 1" in err
    assert "**Warning**" in report and "repulsion_scale" in report
    record, err, report = outcomes["strong"]
    assert record["diag_driving_over_repulsion"] < 1e3
    assert "warning" not in record and "warning" not in err and "**Warning**" not in report
