"""The one training loop, :func:`diverse.fit`, over any iterable of ``(x, y)`` batches.

The CLI (:func:`diverse.app.train.train`) and Python users run the same loop. It
takes an :class:`~diverse.nets.ensemble.Ensemble` of the user's module (made by
:meth:`diverse.methods.catalog.Method.ensemble`), a :class:`~diverse.methods.catalog.Method`, and
the training batches: a ``torch.utils.data.DataLoader`` with the user's own
dataset, transforms, augmentation, workers and sampler, or
:class:`TensorBatches` (in-memory tensors, the CLI's path). One step: move the
batch to the ensemble's device, let the method compute the gradient of its
objective on the stacked parameters (or move them itself: a sampler returns
``grads = None``), set the scheduled learning rate and take one optimizer step
for all members at once.

Determinism and exact resume. Every epoch reseeds the global generator (dropout
masks, transforms in the main process, a sampler without its own generator)
from ``(seed, epoch)``, and the loader's generator — the DataLoader's, its
sampler's, or :class:`TensorBatches`' — from the same seed, so the order and
the worker seeds (drawn from it at ``iter()``) repeat. Checkpoints are written
atomically after every ``checkpoint_every`` epochs and, with
``checkpoint_every_steps = K``, every K steps; a step checkpoint also holds the
global RNG state and the epoch's running sums. Resuming mid-epoch reseeds the
epoch, skips the consumed batches by drawing them (so a loader's own random
state advances exactly as it did), restores the RNG state and goes on: on CPU
the parameters reach those of an uninterrupted run bit for bit. (With
``persistent_workers = True`` the workers are seeded once per loader, not per
epoch: an exact resume then needs ``persistent_workers = False``.)

Nothing assumes the training set on the device or in memory: only the current
batch is moved.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from diverse import metrics, rundir
from diverse.app.checkpointing import Checkpointer, Resumed, set_rng
from diverse.app.config import TrainConfig
from diverse.app.meter import Divergence, EpochMeter
from diverse.app.optim import build_optimizer, schedule_factor
from diverse.app.tracking import NullTracker
from diverse.data.augment import crop_and_flip
from diverse.errors import UserError
from diverse.evaluation.prediction import predict
from diverse.methods.base import LogPosterior, StepResult
from diverse.methods.catalog import Method, check_training
from diverse.methods.train_step import train_step
from diverse.nets import distributed, precision
from diverse.nets.distributed import SINGLE, Comm
from diverse.nets.ensemble import Ensemble
from diverse.nets.likelihoods import (
    Likelihood,
    LikelihoodConfig,
    as_likelihood,
    likelihood_config,
)
from diverse.nets.samples import Samples, save_run_samples
from diverse.progress import Progress

PROGRESS_LOGS = ("driving_over_repulsion", "disagreement")  # method diagnostics shown live
#: Read the step's figures on the host every step? ``None``: on the CPU, where a read
#: is free (and small tensor ops are not), but not on an accelerator, where it would
#: serialize the step; there finiteness, sums and diagnostics stay on the device until
#: the next sync point. Tests set ``False`` to run the accelerator path on the CPU.
HOST_READS_EVERY_STEP: bool | None = None

Batches = Iterable[tuple[Tensor, Tensor]]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without CUDA is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("[train] device = 'cuda': no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch`` (1-based) of a run with seed ``seed``."""
    return (seed * 1_000_033 + epoch * 104_729 + 99_991) % (2**63 - 1)


# ------------------------------------------------------------------ batches
class TensorBatches:
    """In-memory ``(x, y)`` as seeded minibatches of a fresh permutation per epoch.

    ``x (N, ...)``, ``y (N, ...)`` (kept on their device, e.g. moved to the GPU
    once). With ``augment`` (images ``(N, C, H, W)``) every batch is randomly
    cropped with ``crop_padding`` pixels of ``pad_value`` padding and flipped
    horizontally (:func:`diverse.data.augment.crop_and_flip`), from a generator
    seeded with the permutation. :meth:`reseed` sets the seed of the next pass.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, augment: bool = False,
                 crop_padding: int = 4, pad_value: Sequence[float] = (0.0,)) -> None:
        if len(x) != len(y):
            raise UserError(f"TensorBatches: {len(x)} inputs but {len(y)} targets")
        if batch_size < 1:
            raise UserError(f"batch_size = {batch_size}: must be >= 1")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.augment, self.crop_padding, self.pad_value = augment, crop_padding, tuple(pad_value)
        self.seed = 0

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def reseed(self, seed: int) -> None:
        self.seed = seed

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self.x.device
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed))
        order = order.to(device)
        crops = (torch.Generator(device=device).manual_seed(self.seed + 1)
                 if self.augment else None)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            xb = self.x[idx]
            if crops is not None:
                xb = crop_and_flip(xb, self.crop_padding, crops, self.pad_value)
            yield xb, self.y[idx]


def reseed_batches(batches: Batches, seed: int) -> None:
    """Reseed a batch source for the next pass: :class:`TensorBatches`, or a
    ``DataLoader``'s own generator and its sampler's (when they have one; a
    sampler without one draws from the global generator, reseeded by the loop)."""
    if isinstance(batches, TensorBatches):
        batches.reseed(seed)
        return
    if isinstance(batches, DataLoader):
        generators = [batches.generator, getattr(batches.sampler, "generator", None),
                      getattr(getattr(batches.batch_sampler, "sampler", None), "generator", None)]
        for g in {id(g): g for g in generators if isinstance(g, torch.Generator)}.values():
            g.manual_seed(seed)


def steps_per_epoch(batches: Batches) -> int:
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        raise UserError("the training batches have no len(): give a DataLoader over a "
                        "sized dataset (or wrap the iterable in one)") from None
    if n < 1:
        raise UserError("the training batches are empty (len() = 0)")
    return n


# ---------------------------------------------------------------- callbacks
class Callback:
    """Hooks into :func:`fit`; override the ones you need.

    ``on_step(step, result)`` after every update (``step`` counts from 1),
    ``on_epoch(record)`` after every epoch's history record,
    ``on_checkpoint(path)`` after every checkpoint, ``on_end(history)`` at the end.
    """

    def on_step(self, step: int, result: StepResult) -> None:
        """Called after optimizer step ``step``."""

    def on_epoch(self, record: dict[str, Any]) -> None:
        """Called with every epoch's history record."""

    def on_checkpoint(self, path: Path) -> None:
        """Called after a checkpoint is complete."""

    def on_end(self, history: list[dict[str, Any]]) -> None:
        """Called once training ends."""


@dataclass
class FitResult:
    """What :func:`fit` returns: the per-epoch ``history`` and, for a Bayesian
    baseline, the weight ``samples`` its finalizer drew."""

    history: list[dict[str, Any]] = field(default_factory=list)
    samples: Samples | None = None
    state: dict[str, Tensor] = field(default_factory=dict)  # the method's final state


# ---------------------------------------------------------------- prediction
def held_out_figures(ensemble: Ensemble, method: Method, likelihood: Likelihood,
                     x: Tensor | Batches, y: Tensor | None, split: str,
                     comm: Comm = SINGLE) -> dict[str, float]:
    """Accuracy and NLL (classification) or RMSE and NLL (regression) of the current
    members on a held-out set, keyed ``{split}_*``. ``x`` is a tensor with targets
    ``y``, or an iterable of ``(x, y)`` batches (``y = None``)."""
    if y is None:
        targets = torch.cat([b[1].cpu() for b in x])  # type: ignore[union-attr]
    else:
        targets = y.cpu()
    draws = method.prediction_draws()
    pred = predict(ensemble, likelihood, x, samples=draws)
    pred = {k: comm.gather_samples(v, draws) for k, v in pred.items()}  # sharded: all members
    if "probs" in pred:
        return {f"{split}_accuracy": float(metrics.accuracy(pred["probs"], targets)),
                f"{split}_nll": float(metrics.nll(pred["probs"], targets))}
    if targets.dim() == 1:
        targets = targets[:, None]
    means, stds = pred["means"][..., 0], pred["stds"][..., 0]
    return {f"{split}_rmse": float(metrics.rmse(means, targets[:, 0])),
            f"{split}_nll": float(metrics.gaussian_mixture_nll(means, stds, targets[:, 0]))}


# ---------------------------------------------------------------- warnings
#: An epoch whose mean driving/repulsion norm ratio exceeds this gets a warning: the
#: members then move as a deep ensemble's would (D'Angelo & Fortuin 2021's finding at the exact
#: posterior scaling).
REPULSION_WARNING_RATIO = 1e3


def repulsion_warning(record: dict[str, Any]) -> str | None:
    """The warning for an epoch record whose ``diag_driving_over_repulsion`` > 10³, else None."""
    ratio = record.get("diag_driving_over_repulsion")
    if ratio is None or not ratio > REPULSION_WARNING_RATIO:
        return None
    return (f"the driving term is {ratio:.3g}x the repulsion (> {REPULSION_WARNING_RATIO:g}): "
            "the members train as a deep ensemble. Strengthen the repulsion with [method] "
            "repulsion_scale = \"batch\" (the papers' tempered practice), driving_scale < 1, "
            "or an annealing schedule that starts low (annealing = \"hyper\" | \"cyclic\")")


# ---------------------------------------------------------------- saved runs
#: What :func:`diverse.load` needs to rebuild a run trained through the Python API.
MODEL_FILE = rundir.MODEL


def factory_reference(factory: Any) -> dict[str, Any]:
    """How to import ``factory`` again: ``{"factory": "module:qualname", "file": path}``.

    A factory defined at the top level of a module (``file`` is its source, used
    when the module cannot be imported by name, e.g. the script being run) can be
    re-imported by :func:`diverse.load`;
    a lambda or a nested function cannot (``factory`` is then None and ``load``
    needs ``factory=`` given).
    """
    groups = getattr(factory, "groups", None)
    if groups is not None:  # a heterogeneous ensemble: each group's factory and count
        return {"factory": None, "file": None,
                "groups": [{**factory_reference(f), "members": count} for f, count in groups]}
    module = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", "")
    if not module or "<lambda>" in qualname or "<locals>" in qualname:
        return {"factory": None, "file": None}
    source = getattr(sys.modules.get(module), "__file__", None)
    file = str(Path(source).resolve()) if source else None
    if module == "__main__":
        if file is None:
            return {"factory": None, "file": None}
        return {"factory": f"{Path(file).stem}:{qualname}", "file": file}
    return {"factory": f"{module}:{qualname}", "file": file}


def write_model_spec(run_dir: Path, method: Method, ensemble: Ensemble, likelihood: Likelihood,
                     batch: Tensor, outputs: int,
                     normalization: tuple[Sequence[float], Sequence[float]] | None) -> None:
    """``RUN/model.json`` and ``RUN/data.json`` of a Python-API run (atomic), from the
    first training batch's inputs (their shape and dtype: integer ids stay integers)."""
    input_shape = tuple(batch.shape[1:])
    from diverse.data.datasets import DataSpec, write_data_spec

    members = ensemble.members
    if method.spec.generator:
        members = int(ensemble.module.cfg.train_members)  # type: ignore[union-attr]
    mean, std = normalization if normalization is not None else ((0.0,), (1.0,))
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_json(run_dir, rundir.MODEL, {
        "format": "diverse-fit", "method": dataclasses.asdict(method.config),
        "members": members, "seed": ensemble.seed, "execution": ensemble.execution,
        "members_as": ensemble.form.describe(), "input_dtype": str(batch.dtype)[6:],
        "likelihood": dataclasses.asdict(likelihood_config(likelihood)),
        **factory_reference(ensemble.base_factory)})
    write_data_spec(run_dir, DataSpec("custom", likelihood.task, tuple(input_shape), outputs,
                                      tuple(float(v) for v in mean),
                                      tuple(float(v) for v in std)))


# ---------------------------------------------------------------- the loop
@dataclass(frozen=True)
class RunOptions:
    """Where and how a :func:`fit` run keeps itself: its directory, resume, cadence of
    step checkpoints, hooks, progress, logging and what its saved description records.

    Attributes:
        run_dir: where checkpoints (atomic), ``model.json``/``data.json`` and weight
            samples go; None keeps everything in memory (no resume).
        resume: continue from the latest checkpoint in ``run_dir``.
        checkpoint_every_steps: also checkpoint every K steps (default
            ``train.checkpoint_every_steps``; 0 = epochs only).
        callbacks: :class:`Callback` hooks. show_progress: a progress line with ETA.
        tracker: an object with ``log(epoch, record)`` and ``close()`` (a ``[logging]``
            backend); default none.
        run_record: what the checkpoint manifests store under ``config`` (the CLI's
            resolved config, which writes its own ``config.toml``); default: the Python
            API's ``model.json`` + ``data.json`` are written so that :func:`diverse.load`
            rebuilds the run (the factory must be importable, or given to ``load``).
        normalization: per-channel ``(mean, std)`` that :func:`diverse.load`'s
            ``predict`` applies to raw inputs (default none).
        val_name: the prefix of the held-out figures (``{val_name}_accuracy`` ...).
    """

    run_dir: str | Path | None = None
    resume: bool = False
    checkpoint_every_steps: int | None = None
    callbacks: Sequence[Callback] = ()
    show_progress: bool = True
    tracker: Any = None
    run_record: dict[str, Any] | None = None
    normalization: tuple[Sequence[float], Sequence[float]] | None = None
    val_name: str = "val"


def fit(ensemble: Ensemble, method: Method, train_batches: Batches, *, n_train: int,
        likelihood: Likelihood | LikelihoodConfig | str = "categorical",
        train: TrainConfig | None = None, optimizer: torch.optim.Optimizer | None = None,
        val: Batches | tuple[Tensor, Tensor] | None = None, run: RunOptions | None = None,
        comm: Comm | None = None, **options: Any) -> FitResult:
    """Train ``ensemble`` with ``method`` on ``train_batches``; return the history.

    Every step is :func:`~diverse.methods.train_step.train_step`; around it, this loop
    reseeds each epoch, schedules the learning rate, checkpoints
    (:class:`~diverse.app.checkpointing.Checkpointer`), keeps the epoch's figures
    (:class:`~diverse.app.meter.EpochMeter`) and stops at a non-finite step.

    Args:
        ensemble: the members (``method.ensemble(factory, M)``), on their device.
        method: a :class:`~diverse.methods.catalog.Method` (``build_method``).
        train_batches: ``(x, y)`` batches with a length (a ``DataLoader``,
            :class:`TensorBatches`); only the current batch is moved to the device.
        n_train: the training-set size N (the likelihood's weight in the posterior).
        likelihood: ``"categorical"``, ``"gaussian"``, a config or a built likelihood.
        train: epochs or steps, optimizer, learning rate and schedule, prior σ, seed,
            checkpoint cadence, device (the ensemble is moved there; ``"auto"``: CUDA
            when available), precision and compilation
            (:class:`~diverse.app.config.TrainConfig`; ``batch_size`` is the loader's).
        optimizer: an optimizer over ``ensemble.trainable.values()`` instead of the one
            ``train`` describes; the schedule scales each group's initial lr.
        val: a validation loader or ``(x, y)`` tensors, evaluated every
            ``train.eval_every`` epochs and at the end.
        run: :class:`RunOptions`; its fields may also be given as keywords
            (``run_dir=...``, ``resume=True``, ``callbacks=[...]``, ...).
        comm: the member sharding over processes (default: the initialized process
            group, else one process).

    Returns:
        :class:`FitResult`: the per-epoch records (``train_loss``, ``train_nll``,
        ``train_accuracy``/``train_neg_mse``, ``lr``, ``diag_*`` method diagnostics,
        held-out figures, ``warning``), the weight samples of a Bayesian baseline and
        the method's final state.
    """
    t = train if train is not None else TrainConfig()
    o = dataclasses.replace(run or RunOptions(), **options)
    comm = distributed.current() if comm is None else comm
    lead = comm.rank == 0  # writes checkpoints, logs and progress
    like = as_likelihood(likelihood)
    every = _check_fit(ensemble, method, t, o, n_train, comm)
    _place(ensemble, method, t, lead)
    device, run_path = ensemble.device, None if o.run_dir is None else Path(o.run_dir)
    state = method.init_state(ensemble)
    target = LogPosterior(like, n_train, t.prior_std)
    if optimizer is None:
        optimizer = build_optimizer(
            list(ensemble.trainable.values()), t.optimizer, t.lr, momentum=t.momentum,
            nesterov=t.nesterov, betas=(t.betas[0], t.betas[1]), weight_decay=t.weight_decay)
    base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    record_cfg = o.run_record if o.run_record is not None else {
        "method": dataclasses.asdict(method.config), "members": ensemble.members,
        "train": dataclasses.asdict(t)}
    ckpt = Checkpointer(run_path, ensemble, optimizer, state, record_cfg, comm,
                        t.keep_checkpoints, [cb.on_checkpoint for cb in o.callbacks])
    at = ckpt.resume() if o.resume else Resumed()
    spe = steps_per_epoch(train_batches)
    total = t.steps if t.steps > 0 else t.epochs * spe
    total_epochs = math.ceil(total / spe)
    bar = Progress(total, f"train {method.name} M={ensemble.members * comm.size}",
                   enabled=o.show_progress and lead, start=at.step)
    tracker = o.tracker if o.tracker is not None and lead else NullTracker()
    fit_name = "acc" if like.task == "classification" else "neg_mse"
    on_host = device.type == "cpu" if HOST_READS_EVERY_STEP is None else HOST_READS_EVERY_STEP
    kept = lambda: (f"the last good checkpoint is in {latest.parent}"  # noqa: E731
                    if (latest := ckpt.latest()) else "no checkpoint was written yet")
    divergence = Divergence(device, comm, at.step, kept, deferred=not on_host)
    step, history, lr, warned = at.step, at.history, t.lr, False
    for epoch in range(at.epoch, total_epochs + 1):
        seed = epoch_seed(t.seed, epoch)
        torch.manual_seed(seed)
        reseed_batches(train_batches, seed)
        ensemble.train()
        t0 = time.perf_counter()
        meter = EpochMeter(like, device, on_host, at.sums if at.skip else None)
        batches = iter(train_batches)
        for _ in range(at.skip):  # resumed mid-epoch: draw the consumed batches again
            next(batches)
        if at.skip and at.rng:
            set_rng(at.rng, device)
        i, at.skip = at.skip, 0
        for xb, yb in batches:
            if step >= total:
                break
            factor = schedule_factor(t.schedule, step / total, final=t.final_lr_factor)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            lr = base_lrs[0] * factor
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            result = train_step(ensemble, method, optimizer, (xb, yb), target,
                                progress=step / total, index=step, state=state, comm=comm,
                                check=lambda r, s=step: divergence.record(r, s, spe))
            if step == 0 and lead and run_path is not None and o.run_record is None:
                write_model_spec(run_path, method, ensemble, like, xb,
                                 int(result.outputs.shape[-1]), o.normalization)
            step, i = step + 1, i + 1
            meter.add(result, yb)
            if bar.due():
                divergence.check(spe)
                loss_now, fit_now, diag = meter.running_means(PROGRESS_LOGS)
                bar.update(step, epoch=f"{epoch}/{total_epochs}", loss=loss_now,
                           **{fit_name: fit_now}, **diag)  # the epoch's running means
            else:
                bar.update(step)
            for cb in o.callbacks:
                cb.on_step(step, result)
            if every and step % every == 0 and i < spe and step < total:
                divergence.check(spe)
                ckpt.save(epoch - 1, step, history, i, meter.read())
        divergence.check(spe)
        # sharded: the live figures above are rank 0's members; the epoch's are all members'
        record: dict[str, Any] = {"epoch": epoch, "step": step, "lr": lr,
                                  "seconds": time.perf_counter() - t0,
                                  **meter.record(comm, like.task == "classification")}
        last = epoch == total_epochs
        if val is not None and ((t.eval_every > 0 and epoch % t.eval_every == 0) or last):
            vx, vy = val if isinstance(val, tuple) else (val, None)
            record.update(held_out_figures(ensemble, method, like, vx, vy, o.val_name, comm))
        warned = _end_epoch(record, history, tracker, o, bar, lead, warned, spe, total_epochs)
        if not epoch % t.checkpoint_every or last:
            ckpt.save(epoch, step, history)
    bar.close()
    tracker.close()
    result = FitResult(history, state=state)
    result.samples = method.finalize(ensemble, t.seed, t.prior_std, state)  # Bayesian baselines
    if result.samples is not None and lead and run_path is not None:
        save_run_samples(run_path, result.samples, method.name, record_cfg)
    for cb in o.callbacks:
        cb.on_end(history)
    return result


def _check_fit(ensemble: Ensemble, method: Method, t: TrainConfig, o: RunOptions,
               n_train: int, comm: Comm) -> int:
    """UserError for settings that cannot train; returns the step-checkpoint cadence."""
    method.check_ensemble(ensemble)
    check_training(method.name, t.prior_std, t.weight_decay)
    if n_train < 1:
        raise UserError(f"n_train = {n_train}: must be the training-set size (>= 1)")
    every = t.checkpoint_every_steps if o.checkpoint_every_steps is None \
        else o.checkpoint_every_steps
    if every < 0:
        raise UserError(f"checkpoint_every_steps = {every}: must be >= 0")
    if o.resume and o.run_dir is None:
        raise UserError("resume = True needs the run_dir of the run to resume")
    if comm.size > 1 and ensemble.form.name != "full":
        raise UserError(f"members_as = {ensemble.form.name!r} trains in one process; "
                        "sharding members over processes needs members_as = 'full'")
    return every


def _place(ensemble: Ensemble, method: Method, t: TrainConfig, lead: bool) -> None:
    """Move the ensemble to ``[train] device`` and apply precision / compilation once."""
    target = resolve_device(t.device)
    if ensemble.device.type != target.type or (
            target.index is not None and ensemble.device != target):
        ensemble.to(target)
    if ensemble.configured is None:
        precision.configure(ensemble, t.precision, t.compile,
                            double_backward=method.spec.double_backward, name=method.name,
                            notify=None if lead else lambda _text: None)


def _end_epoch(record: dict[str, Any], history: list[dict[str, Any]], tracker: Any,
               o: RunOptions, bar: Progress, lead: bool, warned: bool, spe: int,
               total_epochs: int) -> bool:
    """Append an epoch's record, log it, print it and its repulsion warning (a quiet run
    warns once on stderr; a verbose one every epoch). Returns whether it has warned."""
    warning = repulsion_warning(record)
    if warning is not None:
        record["warning"] = warning
    history.append(record)
    tracker.log(record["epoch"], record)
    for cb in o.callbacks:
        cb.on_epoch(record)
    epoch = record["epoch"]
    if spe >= 10 or epoch == total_epochs or epoch % max(1, total_epochs // 20) == 0:
        bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.items() if k != "warning"))
    if warning is not None and lead and o.show_progress:
        bar.write(f"warning: epoch {epoch}: {warning}")
    elif warning is not None and lead and not warned:
        print(f"diverse: warning: epoch {epoch}: {warning}", file=sys.stderr)
        return True
    return warned


def as_callback(on_step: Callable[[int], None]) -> Callback:
    """A :class:`Callback` calling ``on_step(global_step)`` after every step."""

    class _OnStep(Callback):
        def on_step(self, step: int, result: StepResult) -> None:
            on_step(step)

    return _OnStep()
