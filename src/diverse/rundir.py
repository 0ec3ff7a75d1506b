"""The run directory: the one place that names, reads and writes the files of a run.

A run directory holds

* ``config.toml`` — the resolved config of a CLI run (:data:`CONFIG`);
* ``model.json`` and ``data.json`` — what :func:`diverse.load` rebuilds every run from:
  the method, members, seed, form and likelihood, then the factory (a Python-API run) or
  the ``[model]`` section and precision (a CLI run, written with its ``config.toml``), and
  the input shape, outputs and normalization (:data:`MODEL`, :data:`DATA`);
* ``checkpoints/`` — atomic safetensors + JSON checkpoints (:mod:`diverse.checkpoint`);
* ``samples/`` — a Bayesian baseline's weight samples (:mod:`diverse.nets.samples`);
* ``metrics.json``, ``predictions.npz`` — the evaluation (:data:`METRICS`,
  :data:`PREDICTIONS`); ``calibration.json`` / ``calibration.npz`` — post-hoc calibration;
* ``report.md`` and ``plots/`` — the report.

Every write goes through a temporary file in the same folder and an atomic rename
(:mod:`diverse.checkpoint`), so a crash leaves the previous file or none, never half of
one; every read is JSON, TOML text or arrays without pickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from diverse.checkpoint import atomic_save_npz, atomic_write_json, atomic_write_text

CONFIG = "config.toml"
MODEL = "model.json"
DATA = "data.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.npz"
CALIBRATION = "calibration.json"
CALIBRATION_ARRAYS = "calibration.npz"
REPORT = "report.md"


def path(run_dir: str | Path, name: str) -> Path:
    """``run_dir / name`` for one of this module's file names."""
    return Path(run_dir) / name


def has(run_dir: str | Path, name: str) -> bool:
    return path(run_dir, name).is_file()


def write_text(run_dir: str | Path, name: str, text: str) -> None:
    """Write a text file of the run atomically (``config.toml``, ``report.md``)."""
    atomic_write_text(path(run_dir, name), text)


def write_json(run_dir: str | Path, name: str, obj: Any) -> None:
    """Write a JSON file of the run atomically."""
    atomic_write_json(path(run_dir, name), obj)


def read_json(run_dir: str | Path, name: str) -> Any:
    return json.loads(path(run_dir, name).read_text())


def write_arrays(run_dir: str | Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``.npz`` of the run atomically."""
    atomic_save_npz(path(run_dir, name), arrays)


def read_arrays(run_dir: str | Path, name: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` of the run (never unpickled)."""
    with np.load(path(run_dir, name), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def remove(run_dir: str | Path, name: str) -> None:
    """Delete a file of the run if it is there (e.g. metrics a change made stale)."""
    path(run_dir, name).unlink(missing_ok=True)
