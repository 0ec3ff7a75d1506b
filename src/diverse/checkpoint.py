"""Checkpoints: stacked safetensors plus a JSON manifest, written atomically.

A checkpoint of epoch e in ``RUN_DIR/checkpoints/`` is three files:

* ``epoch-{e:04d}.safetensors`` — every parameter and buffer stacked
  ``(M, ...)`` under its module name (``fc1.weight`` …);
* ``epoch-{e:04d}.optim.safetensors`` — the optimizer state per parameter
  (``fc1.weight::exp_avg`` …);
* ``epoch-{e:04d}.json`` — the manifest: config, versions, epoch, step,
  history so far, and the SHA-256 of both tensor files.

``latest.json`` names the newest complete checkpoint and is replaced last, so
a crash at any moment leaves the previous checkpoint as the one a resume
reads. Every file goes to a temporary name in the same folder, is flushed to
disk and renamed over its target (``os.replace`` is atomic on POSIX). Nothing
is ever unpickled: tensors load through safetensors, metadata through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from diverse.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str | Path, path: Path) -> None:
    """Give a finished temp file the usual permissions and rename it over ``path``.

    ``mkstemp`` creates files readable by the owner only; results are meant to be
    shared like any file the user writes (0666 minus the umask).
    """
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + fsync + rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """Save tensors as safetensors atomically; return the file's SHA-256."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        digest = sha256(Path(tmp))
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` through a temp file + rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import diverse

    return {
        "diverse": diverse.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def save_checkpoint(
    run_dir: Path,
    epoch: int,
    model_tensors: dict[str, Tensor],
    optim_tensors: dict[str, Tensor],
    manifest: dict[str, Any],
    keep: int = 2,
    stem: str | None = None,
) -> Path:
    """Write checkpoint ``epoch`` and point ``latest.json`` at it.

    ``manifest`` (config, step, history, …) is completed with versions, file
    names and hashes. ``stem`` names the files (default ``epoch-NNNN``; a
    mid-epoch checkpoint after epoch e is ``epoch-eeee-step-SSSSSSSS``, which
    sorts between epochs e and e + 1). Older checkpoints beyond ``keep`` are
    deleted after the new one is complete.
    """
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    stem = stem if stem is not None else f"epoch-{epoch:04d}"
    meta = {"format": "diverse-stacked", "epoch": str(epoch)}
    model_hash = atomic_save_tensors(folder / f"{stem}.safetensors", model_tensors, meta)
    optim_hash = atomic_save_tensors(folder / f"{stem}.optim.safetensors", optim_tensors, meta)
    manifest = {
        **manifest,
        "epoch": epoch,
        "versions": versions(),
        "files": {
            "model": {"name": f"{stem}.safetensors", "sha256": model_hash},
            "optimizer": {"name": f"{stem}.optim.safetensors", "sha256": optim_hash},
        },
    }
    atomic_write_json(folder / f"{stem}.json", manifest)
    atomic_write_json(folder / "latest.json", {"manifest": f"{stem}.json", "epoch": epoch})
    stems = sorted(p.name[: -len(".json")] for p in folder.glob("epoch-*.json"))
    for old in stems[:-keep] if keep > 0 else []:
        for suffix in (".safetensors", ".optim.safetensors", ".json"):
            (folder / f"{old}{suffix}").unlink(missing_ok=True)
    return folder / f"{stem}.json"


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """Read the latest complete checkpoint: ``(model tensors, optim tensors, manifest)``.

    Hashes are verified; a missing or corrupt checkpoint raises UserError.
    """
    folder = Path(run_dir) / "checkpoints"
    latest = folder / "latest.json"
    if not latest.is_file():
        raise UserError(f"no checkpoint in {str(folder)!r} (missing latest.json): nothing to load")
    manifest_path = folder / json.loads(latest.read_text())["manifest"]
    manifest = json.loads(manifest_path.read_text())
    loaded = []
    for role in ("model", "optimizer"):
        entry = manifest["files"][role]
        path = folder / entry["name"]
        if not path.is_file() or sha256(path) != entry["sha256"]:
            raise UserError(f"checkpoint file {str(path)!r} is missing or corrupt (hash mismatch)")
        loaded.append(load_file(path))
    return loaded[0], loaded[1], manifest
