"""Checkpoints of a training run: what :func:`diverse.fit` saves and resumes from.

A checkpoint (:mod:`diverse.checkpoint`, atomic safetensors + JSON) holds the ensemble's
member tensors (and its shared trainable ones), the method's state under ``state/``,
the optimizer state, and — mid-epoch — the global RNG state and the epoch's running
sums; its manifest holds the step, the history so far, the resolved execution and the
SHA-256 of the frozen shared weights. :class:`Checkpointer` writes them (gathering
sharded members; the lead process writes) and :meth:`Checkpointer.resume` reads the
latest back into a :class:`Resumed`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diverse.app.meter import Sums
from diverse.app.optim import load_optimizer_tensors, optimizer_tensors
from diverse.checkpoint import load_checkpoint, save_checkpoint
from diverse.errors import UserError
from diverse.nets import distributed
from diverse.nets.distributed import Comm
from diverse.nets.ensemble import Ensemble

#: the key prefix of the method's state in a checkpoint's model tensors
STATE = "state/"
RNG_KEY = "rng/cpu"
CUDA_RNG_KEY = "rng/cuda"


def split_state(model_t: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The method's state ``{name: (M, ...)}`` among a checkpoint's model tensors."""
    return {k[len(STATE):]: v.to(device) for k, v in model_t.items() if k.startswith(STATE)}


def check_frozen(manifest: dict[str, Any], fingerprint: str | None) -> None:
    """UserError when the frozen shared weights differ from those the run trained with."""
    saved = manifest.get("frozen_sha256")
    if saved is not None and saved != fingerprint:
        raise UserError(f"the frozen shared weights differ from the run's (SHA-256 "
                        f"{(fingerprint or 'none')[:12]}… vs {saved[:12]}… recorded): load the "
                        "same pretrained weights the run was trained with")


def rng_tensors(device: torch.device) -> dict[str, Tensor]:
    """The global RNG state (and the CUDA one on a CUDA device) as tensors."""
    out = {RNG_KEY: torch.get_rng_state()}
    if device.type == "cuda":
        out[CUDA_RNG_KEY] = torch.cuda.get_rng_state(device)
    return out


def set_rng(tensors: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors[RNG_KEY].to(torch.uint8).cpu())
    if device.type == "cuda" and CUDA_RNG_KEY in tensors:
        torch.cuda.set_rng_state(tensors[CUDA_RNG_KEY].to(torch.uint8).cpu(), device)


@dataclass
class Resumed:
    """Where a run goes on: the global step, the next epoch, the history, the batches of
    the epoch already consumed (``skip``), its running sums and the RNG state to restore."""

    step: int = 0
    epoch: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    skip: int = 0
    sums: Sums = field(default_factory=Sums)
    rng: dict[str, Tensor] | None = None


class Checkpointer:
    """Saves and resumes one run's checkpoints in ``run_dir`` (None: nothing is saved).

    Args:
        run_dir: the run directory, or None.
        ensemble, optimizer, state: what is saved (the method's state dict is saved and
            restored in place).
        record: what the manifests store under ``config``.
        comm: the member sharding (rank 0 writes).
        keep: checkpoints kept (``[train] keep_checkpoints``).
        on_checkpoint: called with the path of every complete checkpoint.
    """

    def __init__(self, run_dir: Path | None, ensemble: Ensemble,
                 optimizer: torch.optim.Optimizer, state: dict[str, Tensor],
                 record: dict[str, Any], comm: Comm, keep: int,
                 on_checkpoint: Sequence[Callable[[Path], None]] = ()) -> None:
        self.run_dir, self.ensemble, self.optimizer = run_dir, ensemble, optimizer
        self.state, self.record, self.comm, self.keep = state, record, comm, keep
        self.on_checkpoint = on_checkpoint
        self.names = list(ensemble.trainable)
        self.frozen = ensemble.frozen_fingerprint()

    def latest(self) -> Path | None:
        """The newest complete checkpoint's manifest, if any."""
        path = None if self.run_dir is None else self.run_dir / "checkpoints" / "latest.json"
        return path if path is not None and path.is_file() else None

    def save(self, epoch_done: int, step: int, history: list[dict[str, Any]],
             epoch_step: int = 0, partial: Sums | None = None) -> None:
        """Checkpoint after ``step`` steps; mid-epoch (``partial``) with the RNG state and
        the epoch's running sums. Every rank calls it."""
        comm, ens = self.comm, self.ensemble
        model_t = distributed.gather_tensors(comm, {**ens.state_tensors(),
                                                    **{STATE + k: v for k, v in
                                                       self.state.items()}})
        optim_t = distributed.gather_tensors(comm, optimizer_tensors(self.optimizer,
                                                                     self.names))
        if partial is not None:
            optim_t = {**optim_t, **rng_tensors(ens.device)}
        if comm.rank == 0 and self.run_dir is not None:
            manifest: dict[str, Any] = {
                "config": self.record, "step": step, "frozen_sha256": self.frozen,
                "members": ens.members * comm.size, "execution": ens.execution,
                "history": history, "epoch_step": epoch_step}
            if partial is not None:
                manifest["partial"] = partial.as_record()
            stem = (f"epoch-{epoch_done:04d}" if partial is None
                    else f"epoch-{epoch_done:04d}-step-{step:08d}")
            path = save_checkpoint(self.run_dir, epoch_done, model_t, optim_t, manifest,
                                   keep=self.keep, stem=stem)
            for call in self.on_checkpoint:
                call(path)
        comm.barrier()  # the checkpoint is complete before any rank goes on

    def resume(self) -> Resumed:
        """Load the latest checkpoint into the ensemble, the optimizer and the state."""
        if self.run_dir is None:
            raise UserError("resume = True needs the run_dir of the run to resume")
        comm, ens = self.comm, self.ensemble
        model_t, optim_t, manifest = load_checkpoint(self.run_dir)  # all members: this rank's
        check_frozen(manifest, self.frozen)
        rng = {k: optim_t.pop(k) for k in (RNG_KEY, CUDA_RNG_KEY) if k in optim_t}
        members = manifest.get("members", ens.members * comm.size)
        model_t = distributed.shard_tensors(comm, model_t, members)
        optim_t = distributed.shard_tensors(comm, optim_t, members)
        ens.load_state_tensors({k: v.to(ens.device) for k, v in model_t.items()})
        with torch.no_grad():
            for k, v in split_state(model_t, ens.device).items():
                self.state[k].copy_(v)
        load_optimizer_tensors(self.optimizer, self.names, optim_t)
        ens.execution = manifest["execution"]
        skip = manifest.get("epoch_step", 0)
        return Resumed(manifest["step"], manifest["epoch"] + 1, manifest["history"], skip,
                       Sums.from_record(manifest["partial"]) if skip else Sums(), rng or None)
