"""Optional experiment-tracking backends: TensorBoard and MLflow.

The ``[logging]`` section picks one. ``"none"`` (the default) writes nothing
beyond the run directory; the per-epoch history is always in the checkpoint
manifest and the report whatever the backend. With a backend, every epoch's
history record (``train_loss``, ``lr``, ``test_nll``, ``diag_*``, …) is logged
under its own name at step = epoch, and the resolved config as parameters.

The packages are optional extras, imported only when selected:
``pip install 'diverse[tensorboard]'`` or ``pip install 'diverse[mlflow]'``
(``mlflow-skinny`` is enough: runs go to a local file store, no server, no
database). A missing package fails when a training run is built, before any
run directory is created; evaluating or reporting a finished run does not need
it.

MLflow notes: MLflow ≥ 3.7 refuses its file store unless
``MLFLOW_ALLOW_FILE_STORE=true`` (its database store needs SQLAlchemy, which
only the full ``mlflow`` package brings), so we set that variable for a
``file:`` store unless the user set it; and we set ``MLFLOW_DISABLE_TELEMETRY``
(unless set) because an offline file store should send nothing anywhere. The
MLflow run id is kept in ``RUN/mlflow_run.json`` so a resumed run logs into the
same MLflow run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from diverse.errors import UserError

BACKENDS = ("none", "tensorboard", "mlflow")

#: backend -> (module that must be importable, pip extra that installs it)
_REQUIRES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}

MLFLOW_RUN_FILE = "mlflow_run.json"


@dataclass(frozen=True)
class LoggingConfig:
    """The ``[logging]`` section.

    Fields:
        backend: ``"none"`` (write nothing beyond the run directory),
            ``"tensorboard"`` or ``"mlflow"`` (default ``"none"``).
        experiment: MLflow experiment name (default ``"diverse"``); TensorBoard
            ignores it.
        tracking_dir: where the backend writes. Default ``""``: inside the run
            directory, ``RUN/tensorboard`` or ``RUN/mlruns``. A folder given here
            is shared by runs: TensorBoard writes to ``tracking_dir/<run name>``,
            MLflow uses it as its file store (``file://`` URI). A value with
            ``://`` (e.g. ``sqlite:///mlflow.db``) is passed to MLflow as the
            tracking URI unchanged.
    """

    backend: str = "none"
    experiment: str = "diverse"
    tracking_dir: str = ""


def check_backend(cfg: LoggingConfig, packages: bool = True) -> None:
    """Raise :class:`UserError` for an unknown backend or (``packages``) a missing package.

    Config validation checks the names only (``packages=False``): a finished
    run logged to MLflow can be evaluated where MLflow is not installed.
    Training checks the package too, before it writes anything.
    """
    if cfg.backend not in BACKENDS:
        raise UserError(f"[logging] backend = {cfg.backend!r}: allowed {', '.join(BACKENDS)}")
    if packages and cfg.backend in _REQUIRES:
        module, extra = _REQUIRES[cfg.backend]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"[logging] backend = {cfg.backend!r} needs the {module!r} package: "
                            f"pip install 'diverse[{extra}]'")
    if cfg.backend == "mlflow" and not cfg.experiment:
        raise UserError("[logging] experiment = '': an MLflow experiment needs a name")


class Tracker(Protocol):
    """Receives one record per epoch; ``close`` ends the run (idempotent)."""

    def log(self, step: int, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """``{"train": {"lr": 0.01}}`` → ``{"train.lr": "0.01"}`` (lists as JSON)."""
    out: dict[str, str] = {}
    for section, table in config.items():
        if isinstance(table, dict):
            for key, value in table.items():
                out[f"{section}.{key}"] = (json.dumps(value) if isinstance(value, list | tuple)
                                           else str(value))
        else:
            out[section] = str(table)
    return out


def metric_values(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a history record, less ``epoch`` (it is the step)."""
    return {k: float(v) for k, v in record.items()
            if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v)}


class NullTracker:
    """Backend ``"none"``: logs nothing, writes nothing."""

    def log(self, step: int, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars to TensorBoard event files (``torch.utils.tensorboard``)."""

    def __init__(self, log_dir: Path, params: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))
        table = "\n".join(["| key | value |", "|---|---|"]
                          + [f"| {k} | {v} |" for k, v in params.items()])
        self.writer.add_text("config", table, 0)
        self.writer.flush()
        self._finalizer = weakref.finalize(self, self.writer.close)

    def log(self, step: int, record: dict[str, Any]) -> None:
        for key, value in metric_values(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # an interrupted run keeps every finished epoch

    def close(self) -> None:
        self._finalizer()


def _mlflow_uri(cfg: LoggingConfig, run_dir: Path) -> str:
    if "://" in cfg.tracking_dir:
        return cfg.tracking_dir
    root = Path(cfg.tracking_dir) if cfg.tracking_dir else run_dir / "mlruns"
    return root.resolve().as_uri()


class MlflowTracker:
    """Metrics and params to an MLflow run through ``MlflowClient`` (no global state)."""

    def __init__(self, uri: str, experiment: str, run_dir: Path, params: dict[str, str]) -> None:
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        record_path = run_dir / MLFLOW_RUN_FILE
        saved = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if saved.get("tracking_uri") == uri:  # a resumed run continues its MLflow run
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found is not None
                             else self.client.create_experiment(experiment))
            self.run_id = self.client.create_run(experiment_id,
                                                 run_name=run_dir.resolve().name).info.run_id
            items = [Param(k, v) for k, v in params.items()]
            for start in range(0, len(items), 100):  # MLflow takes ≤ 100 params per batch
                self.client.log_batch(self.run_id, params=items[start:start + 100])
            run_dir.mkdir(parents=True, exist_ok=True)
            record_path.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id,
                                               "experiment": experiment}) + "\n")
        self._finalizer = weakref.finalize(self, self.client.set_terminated, self.run_id)

    def log(self, step: int, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, v, stamp, step) for k, v in metric_values(record).items()])

    def close(self) -> None:
        self._finalizer()


def open_tracker(cfg: LoggingConfig, run_dir: Path, params: dict[str, Any]) -> Tracker:
    """The tracker of ``cfg.backend`` for the run in ``run_dir``.

    ``params`` is the resolved config (``config_to_dict``), logged as flat
    ``section.key`` parameters. ``"none"`` returns a no-op tracker.
    """
    check_backend(cfg)
    run_dir = Path(run_dir)
    flat = flat_params(params)
    if cfg.backend == "tensorboard":
        log_dir = (Path(cfg.tracking_dir) / run_dir.resolve().name if cfg.tracking_dir
                   else run_dir / "tensorboard")
        return TensorBoardTracker(log_dir, flat)
    if cfg.backend == "mlflow":
        return MlflowTracker(_mlflow_uri(cfg, run_dir), cfg.experiment, run_dir, flat)
    return NullTracker()
