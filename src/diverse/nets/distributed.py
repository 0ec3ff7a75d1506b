"""Members sharded over processes with ``torch.distributed`` (launched by torchrun).

With R processes (ranks), rank r holds members ``[r·M/R, (r+1)·M/R)`` of an
ensemble of M (M must be divisible by R). Members are initialized from
``(seed, global member index)`` (:func:`diverse.nets.ensemble.member_seed`), so the
shards of an R-rank run are exactly the rows of the 1-process ensemble, and
every rank draws the same minibatch (the epoch's seeded permutation).

Interaction terms need every member's embedding (flattened weights, function
outputs, input gradients). A rank computes the embeddings of its own members,
``(M/R, D)``; :meth:`Comm.gather` concatenates the rows of all ranks in member
order into ``(M, D)`` — this rank's rows are its own tensor (autograd reaches
them), the other rows are detached copies; the interaction is then computed on
the full set, identically on every rank, and :meth:`Comm.local` keeps this
rank's rows of the result. Replicating the ``M × M`` interaction costs
``O(M²·D)`` per rank, small next to the forward/backward of ``M/R`` members
unless ``M·R`` approaches the batch size; in exchange every rank sees the same
kernel matrix, bandwidth and diagnostics as a 1-process run. A deep ensemble
communicates nothing inside a step.

What is exact (equal to a 1-process run up to float rounding, ~1e-7): every
supported method on a model without dropout. Dropout masks are drawn per
member from the global generator inside ``vmap`` (``randomness="different"``),
so a shard draws other masks than the same members in a 1-process run: the
training is statistically the same, not numerically. Function-space methods
draw context points and weight-prior samples from the global generator, which
must agree across ranks; with dropout the ranks' generators drift apart, so
that combination is refused (:func:`check_sharding`).

Checkpoints hold all M members (rank 0 gathers and writes), so a run resumes
with any rank count that divides M (:func:`shard_tensors`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from diverse.errors import UserError


@dataclass(frozen=True)
class Comm:
    """This process's place among ``size`` ranks (``Comm()``: one process, no collectives).

    Attributes:
        rank: this process's rank r in ``[0, size)`` (default 0).
        size: the number of ranks R (default 1).
    """

    rank: int = 0
    size: int = 1

    def shard(self, members: int) -> tuple[int, int]:
        """``(offset, count)``: the global index of this rank's first member, and M/R."""
        if members % self.size:
            raise UserError(
                f"[ensemble] members = {members} cannot be split over {self.size} processes: "
                f"use a multiple of {self.size}, or launch a number of processes dividing "
                f"{members}"
            )
        count = members // self.size
        return self.rank * count, count

    def gather(self, t: Tensor) -> Tensor:
        """``(M/R, ...)`` on every rank → ``(M, ...)``, rows in member order.

        This rank's rows are ``t`` itself (gradients flow to them), the other
        ranks' rows are detached. Every rank must call it with the same shape.
        """
        if self.size == 1:
            return t
        parts = _all_gather(t)
        parts[self.rank] = t
        return torch.cat(parts)

    def gather_samples(self, t: Tensor, samples: int = 1) -> Tensor:
        """Draw-major predictive samples ``(S·M/R, ...)`` → ``(S·M, ...)`` (detached).

        ``samples`` draws per member are stacked ``[draw 0 of this rank's
        members, draw 1, …]``; the result keeps that order over all M members.
        """
        if self.size == 1:
            return t
        shaped = [p.reshape(samples, -1, *p.shape[1:]) for p in _all_gather(t)]
        return torch.cat(shaped, dim=1).flatten(0, 1)

    def local(self, full: Tensor) -> Tensor:
        """This rank's rows ``(M/R, ...)`` of a tensor ``(M, ...)`` over all members."""
        if self.size == 1:
            return full
        count = full.shape[0] // self.size
        return full[self.rank * count:(self.rank + 1) * count]

    def mean(self, values: Tensor) -> Tensor:
        """The mean over ranks of a tensor (the same tensor with one rank)."""
        if self.size == 1:
            return values
        total = values.detach().to(_wire_device(), copy=True)
        dist.all_reduce(total)
        return total.to(values.device) / self.size

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (a picklable value) on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank reaches this point (no-op with one rank)."""
        if self.size > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if self.size == 1:
            return flag
        t = torch.tensor([float(flag)], device=_wire_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


SINGLE = Comm()


def _wire_device() -> torch.device:
    """Where collectives take their tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(t: Tensor) -> list[Tensor]:
    """Every rank's copy of ``t`` (detached, on ``t``'s device), in rank order."""
    wire = t.detach().to(_wire_device()).contiguous()
    parts = [torch.empty_like(wire) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, wire)
    return [p.to(t.device) for p in parts]


# ----------------------------------------------------------------- process group
def current() -> Comm:
    """The sharding given by the default process group (``Comm()`` if there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Comm(dist.get_rank(), dist.get_world_size())
    return SINGLE


def init_from_env(device: torch.device) -> Comm:
    """Join the process group described by torchrun's environment variables.

    ``WORLD_SIZE`` ≤ 1 (or unset) means one process: nothing is initialized.
    Otherwise ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
    must be set (torchrun sets them); the backend is NCCL for a CUDA device
    (rank uses ``cuda:LOCAL_RANK``) and gloo on CPU. Joining twice is a no-op.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(f"WORLD_SIZE = {size} but {missing[0]} is not set: launch the "
                        f"processes with torchrun (see docs/scaling.md)")
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current()


def rank_device(device: torch.device) -> torch.device:
    """A CUDA device without an index becomes ``cuda:LOCAL_RANK`` (one GPU per rank)."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def has_dropout(module: nn.Module) -> bool:
    """Whether any submodule is a dropout layer with a positive rate."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
               for m in module.modules())


def check_sharding(comm: Comm, method: Any, prior_std: float, module: nn.Module, *,
                   shardable: bool, function_space: bool,
                   allowed: tuple[str, ...] = ()) -> None:
    """Refuse a sharded run the sharding cannot do right (a one-line UserError).

    ``shardable`` and ``function_space`` are the method table's facts
    (:class:`diverse.methods.catalog.MethodSpec`).
    """
    if comm.size == 1:
        return
    if not shardable:
        raise UserError(
            f"[method] name = {method.name!r} cannot run over {comm.size} processes; methods "
            f"with multi-process support: {', '.join(allowed)}"
        )
    shared_draws = getattr(method, "context_points", 0) > 0 or prior_std > 0
    if function_space and shared_draws and has_dropout(module):
        raise UserError(
            f"[method] name = {method.name!r} with dropout over {comm.size} processes: context "
            "points and prior draws would differ between processes; set model dropout = 0 or "
            "run in one process"
        )


# ------------------------------------------------------------------- checkpoints
def gather_tensors(comm: Comm, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Stacked tensors of this rank's members → all members' (every rank calls it).

    Every tensor with at least one dimension is stacked over members (parameters,
    buffers, per-member optimizer state); 0-d tensors (Adam's step count) are
    the same on every rank and kept. Keys are visited in the mapping's order,
    which must be the same on every rank.
    """
    if comm.size == 1:
        return dict(tensors)
    return {k: comm.gather(v.detach()) if v.dim() > 0 else v for k, v in tensors.items()}


def shard_tensors(comm: Comm, tensors: Mapping[str, Tensor], members: int) -> dict[str, Tensor]:
    """All members' stacked tensors (a checkpoint) → this rank's rows.

    ``members`` is the run's M; a tensor stacked over another count is refused.
    With one process the tensors are returned as they are.
    """
    if comm.size == 1:
        return dict(tensors)
    offset, count = comm.shard(members)
    out = {}
    for k, v in tensors.items():
        if v.dim() == 0:
            out[k] = v
            continue
        if v.shape[0] != members:
            raise UserError(f"checkpoint tensor {k!r} holds {v.shape[0]} members, the run "
                            f"has [ensemble] members = {members}")
        out[k] = v[offset:offset + count]
    return out
