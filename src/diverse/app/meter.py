"""An epoch's running figures and the divergence stop of :func:`diverse.fit`.

:class:`EpochMeter` sums the method's objective, the fit (accuracy or −MSE), the data
term and the method's diagnostics over an epoch, in float64. On the CPU a host read is
free (and small tensor ops are not), so the sums are kept on the host; on an accelerator
a read would serialize the step, so they stay on the device until a sync point (the
progress line, a checkpoint, the epoch's end) — the same numbers either way.
:class:`Divergence` stops training at the first non-finite loss or update, naming its
step; on an accelerator the first bad step is recorded on the device and read at the
sync points, so a checkpoint is only written after a check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diverse.errors import DivergenceError
from diverse.methods.base import StepResult
from diverse.nets.distributed import Comm
from diverse.nets.likelihoods import Likelihood


@dataclass
class Sums:
    """The running sums of one epoch (saved in a mid-epoch checkpoint)."""

    loss: float = 0.0
    fit: float = 0.0
    count: int = 0
    steps: int = 0
    nll: float = 0.0
    diag: dict[str, float] = field(default_factory=dict)
    diag_steps: dict[str, int] = field(default_factory=dict)  # steps that reported each key

    def as_record(self) -> dict[str, Any]:
        return {"loss": self.loss, "fit": self.fit, "count": self.count, "steps": self.steps,
                "nll": self.nll, "diag": self.diag, "diag_steps": self.diag_steps}

    @classmethod
    def from_record(cls, partial: dict[str, Any]) -> Sums:
        return cls(partial["loss"], partial["fit"], partial["count"], partial["steps"],
                   partial["nll"], dict(partial["diag"]),
                   dict(partial.get("diag_steps")
                        or {k: partial["steps"] for k in partial["diag"]}))


class EpochMeter:
    """The running figures of one epoch (module docstring).

    Args:
        likelihood: the run's likelihood (its ``correct`` and ``nll``).
        device: where the members live. on_host: read every step (the CPU's choice).
        sums: the sums to start from (a resumed epoch's), else zeros.
    """

    def __init__(self, likelihood: Likelihood, device: torch.device, on_host: bool,
                 sums: Sums | None = None) -> None:
        self.like, self.on_host = likelihood, on_host
        self.sums = sums if sums is not None else Sums()
        self.nll_sum = torch.tensor(self.sums.nll, device=device)
        self.running = torch.tensor([self.sums.loss, self.sums.fit], dtype=torch.float64,
                                    device=device)
        self.diag_device: dict[str, Tensor] = {}  # an accelerator's diagnostics since a read

    def add(self, result: StepResult, y: Tensor) -> None:
        """Add one step's figures."""
        sums, n_b = self.sums, len(y)
        if self.on_host:
            sums.loss += float(result.loss.mean()) * n_b
            sums.fit += float(self.like.correct(result.outputs, y).mean()) * n_b
        else:
            self.running += torch.stack([result.loss.detach().mean().double(),
                                         self.like.correct(result.outputs, y).mean().double()
                                         ]) * n_b
        # the data term only
        self.nll_sum = self.nll_sum + self.like.nll(result.outputs, y).sum() / len(result.outputs)
        sums.count += n_b
        sums.steps += 1
        for key, value in result.logs.items():  # floats or 0-dim tensors
            # a method may report a diagnostic on some steps only (FoRDE's term norms)
            sums.diag_steps[key] = sums.diag_steps.get(key, 0) + 1
            if self.on_host or not isinstance(value, Tensor):
                sums.diag[key] = sums.diag.get(key, 0.0) + float(value)
            else:
                self.diag_device[key] = self.diag_device.get(key, 0.0) + value.detach()

    def read(self) -> Sums:
        """The sums on the host (a sync point on an accelerator)."""
        sums = self.sums
        sums.nll = float(self.nll_sum)
        if not self.on_host:
            sums.loss, sums.fit = self.running.tolist()
            for key, value in self.diag_device.items():
                sums.diag[key] = sums.diag.get(key, 0.0) + float(value)
            self.diag_device.clear()
        return sums

    def running_means(self, keys: tuple[str, ...]) -> tuple[float, float, dict[str, float]]:
        """The epoch's running mean objective, fit and the named diagnostics."""
        sums = self.sums
        if not self.on_host:
            for key, value in self.diag_device.items():
                sums.diag[key] = sums.diag.get(key, 0.0) + float(value)
            self.diag_device.clear()
        totals = (sums.loss, sums.fit) if self.on_host else self.running.tolist()
        loss, fit = (v / sums.count for v in totals)
        return loss, fit, {k: sums.diag[k] / sums.diag_steps[k] for k in keys if k in sums.diag}

    def record(self, comm: Comm, classification: bool) -> dict[str, Any]:
        """The epoch's figures over all members (sharded: averaged over processes):
        ``train_loss`` (the method's own objective per example — what it includes is
        the method's), ``train_nll`` (the mean member NLL, the same for every method),
        ``train_accuracy`` / ``train_neg_mse`` and ``diag_*`` means."""
        sums = self.read()
        loss_m, fit_m, nll_m = comm.mean(torch.tensor(
            [sums.loss, sums.fit, sums.nll], dtype=torch.float64)).tolist()
        count = max(sums.count, 1)
        out: dict[str, Any] = {
            "train_loss": loss_m / count, "train_nll": nll_m / count,
            ("train_accuracy" if classification else "train_neg_mse"): fit_m / count}
        out.update({f"diag_{k}": v / max(sums.diag_steps.get(k, sums.steps), 1)
                    for k, v in sums.diag.items()})
        return out


class Divergence:
    """The training stop at the first non-finite loss or update, naming its step
    (module docstring). ``deferred``: record on the device, check at sync points."""

    def __init__(self, device: torch.device, comm: Comm, step: int,
                 kept: Callable[[], str], deferred: bool) -> None:
        self.deferred = deferred
        self.comm = comm
        self.kept = kept  # what is kept, said in the message
        if self.deferred:
            self.step = torch.full((), step, dtype=torch.long, device=device)
            self.first = torch.full((), -1, dtype=torch.long, device=device)
            self.grads_bad = torch.zeros((), dtype=torch.bool, device=device)

    def record(self, result: StepResult, step: int, spe: int) -> None:
        """Check (CPU) or record (accelerator) this step's loss and update."""
        loss_ok = torch.isfinite(result.loss).all()
        grads = list((result.grads or {}).values())
        grads_ok = (torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads
                    else torch.ones_like(loss_ok))
        if not self.deferred:
            if self.comm.any(not bool(loss_ok & grads_ok)):
                self._raise(step, spe, not bool(grads_ok))
            return
        newly = ~(loss_ok & grads_ok) & (self.first < 0)
        self.first = torch.where(newly, self.step, self.first)
        self.grads_bad = torch.where(newly, ~grads_ok, self.grads_bad)
        self.step += 1

    def check(self, spe: int) -> None:
        """Raise if a recorded step was non-finite (a host read on an accelerator)."""
        if not self.deferred:
            return
        first = int(self.first)
        if self.comm.any(first >= 0):
            self._raise(max(first, 0), spe, bool(self.grads_bad))

    def _raise(self, step: int, spe: int, grads_bad: bool) -> None:
        what = "update (gradient)" if grads_bad else "loss"
        raise DivergenceError(f"non-finite {what} at epoch {step // spe + 1} step "
                              f"{step % spe + 1} (global step {step + 1}); {self.kept()}")
