"""[logging] backends: TensorBoard and MLflow receive exactly the run's history."""

import json
import sys

import pytest

from diverse.app.cli import main
from diverse.app.config import config_to_dict, load_config
from diverse.app.tracking import LoggingConfig, check_backend, flat_params, metric_values
from diverse.app.train import build_run, train
from diverse.errors import UserError

TINY = ["data.name=blobs", "data.n_train=96", "model.hidden=[8]", "ensemble.members=2",
        "ensemble.execution=vmap", "train.epochs=3", "train.batch_size=32", "train.lr=0.01",
        "method.name=de"]


def _train(run_dir, *logging):
    cfg = load_config(None, [*TINY, *logging])
    history = train(build_run(cfg), run_dir, show_progress=False)
    return cfg, history


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_tensorboard_event_files_hold_the_history(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    _cfg, history = _train(run_dir, "logging.backend=tensorboard")
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    logged = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    expected = {key for r in history for key in metric_values(r)}
    assert set(logged) == expected and {"train_loss", "lr", "test_nll"} <= expected
    for r in history:
        for key, value in metric_values(r).items():
            assert logged[key][r["epoch"]] == pytest.approx(value, rel=1e-6)  # float32 events
    assert sorted(logged["train_loss"]) == [1, 2, 3]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| train.lr | 0.01 |" in text and "| data.name | blobs |" in text  # resolved config


def test_mlflow_file_store_holds_the_history_and_params(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    cfg, history = _train(run_dir, "logging.backend=mlflow", "logging.experiment=tiny")
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    assert saved["tracking_uri"] == (run_dir / "mlruns").resolve().as_uri()
    client = MlflowClient(saved["tracking_uri"])
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.data.params == flat_params(config_to_dict(cfg))
    assert run.data.params["train.lr"] == "0.01" and run.data.params["model.hidden"] == "[8]"
    for key in {k for r in history for k in metric_values(r)}:
        points = {m.step: m.value for m in client.get_metric_history(saved["run_id"], key)}
        assert points == {r["epoch"]: pytest.approx(metric_values(r)[key])
                          for r in history if key in metric_values(r)}


def test_mlflow_resume_logs_into_the_same_run(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    cfg = load_config(None, [*TINY, "train.epochs=4", "logging.backend=mlflow"])

    def stop_after_epoch_2(step):
        if step == 2 * 3:  # 96 points / batch 32 = 3 steps per epoch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(build_run(cfg), run_dir, show_progress=False, on_step=stop_after_epoch_2)
    history = train(build_run(cfg), run_dir, resume=True, show_progress=False)
    saved = json.loads((run_dir / "mlflow_run.json").read_text())
    client = MlflowClient(saved["tracking_uri"])
    experiment = client.get_experiment_by_name("diverse")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    points = client.get_metric_history(saved["run_id"], "train_loss")
    assert sorted({m.step for m in points}) == [1, 2, 3, 4]
    by_step = {m.step: m.value for m in points}
    assert by_step == {r["epoch"]: pytest.approx(r["train_loss"]) for r in history}


def test_none_writes_nothing_outside_the_run_dir(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _files(tmp_path)
    run_dir = tmp_path / "run"
    _train(run_dir)
    after = [f for f in _files(tmp_path) if not f.startswith("run")]
    assert after == before
    assert not {"tensorboard", "mlruns", "mlflow_run.json"} & {p.name for p in run_dir.rglob("*")}


def test_bad_backend_and_missing_package_fail_before_the_run_dir(tmp_path, capsys, monkeypatch):
    with pytest.raises(UserError, match=r"\[logging\] backend = 'wandb': allowed none, "):
        check_backend(LoggingConfig(backend="wandb"))
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        None if name == "tensorboard" else real_find_spec(name, *a)))
    cfg = tmp_path / "c.toml"
    cfg.write_text('[logging]\nbackend = "tensorboard"\n')
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--set", "data.name=blobs", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'diverse[tensorboard]'" in err and err.count("\n") == 1
    assert not out.exists()


def test_a_finished_run_evaluates_without_its_logging_package(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[logging]\nbackend = "tensorboard"\n')
    sets = [arg for s in TINY for arg in ("--set", s)]
    run_dir = tmp_path / "run"
    assert main(["train", str(cfg), *sets, "--out", str(run_dir), "--quiet"]) == 0
    before = json.loads((run_dir / "metrics.json").read_text())
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        None if name == "tensorboard" else real_find_spec(name, *a)))
    capsys.readouterr()
    # evaluating reads the config (names checked) but logs nothing: no package needed
    assert main(["evaluate", str(run_dir)]) == 0
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["accuracy"] == before["accuracy"] and after["nll"] == before["nll"]
    # training (here: resuming the run) still needs it, and says so before touching the run
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "pip install 'diverse[tensorboard]'" in capsys.readouterr().err
