"""The training loop shared by every method, with checkpoints and exact resume.

One step: draw the minibatch of the epoch's seeded permutation, let the method
compute the gradient of its objective on the stacked parameters, set the
scheduled learning rate, and take one optimizer step for all members at once.

Determinism: initialization uses ``(seed, member)``; each epoch reseeds the
global generator (dropout masks) and the shuffling generator from
``(seed, epoch)``. A checkpoint is written atomically after every epoch, so a
run killed at any point resumes from the last finished epoch and reaches
exactly (bit for bit on CPU) the parameters of an uninterrupted run.

Sharded over processes (:mod:`diverse.distributed`, launched by torchrun),
each rank trains its share of the members on the same minibatches; rank 0
gathers all members into the usual checkpoint and writes history and logs.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diverse import distributed, metrics, precision
from diverse import samples as sample_set
from diverse.augment import crop_and_flip
from diverse.catalog import METHODS, predict_samples
from diverse.checkpoint import load_checkpoint, save_checkpoint
from diverse.config import Config, config_to_dict
from diverse.data import Dataset, load_dataset, write_data_spec
from diverse.distributed import SINGLE, Comm
from diverse.ensemble import Ensemble, evaluating
from diverse.errors import DivergenceError, UserError
from diverse.likelihoods import Likelihood, build_likelihood
from diverse.methods import Step, StepResult
from diverse.models import build_model
from diverse.optim import (
    build_optimizer,
    load_optimizer_tensors,
    optimizer_tensors,
    schedule_factor,
    set_lr,
)
from diverse.progress import Progress
from diverse.samples import Samples, base_model, has_samples, load_samples, save_samples
from diverse.tracking import NullTracker, check_backend, open_tracker

PROGRESS_LOGS = ("driving_over_repulsion", "disagreement")  # method diagnostics shown live


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("[train] device = 'cuda': no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_033 + epoch * 104_729 + 99_991) % (2**63 - 1)


@dataclass
class Run:
    """The live objects of a run, built from a config."""

    cfg: Config
    dataset: Dataset
    likelihood: Likelihood
    ensemble: Ensemble
    update: Callable[[Step], StepResult]
    optimizer: torch.optim.Optimizer
    device: torch.device
    comm: Comm = SINGLE  # the member sharding; the ensemble holds this rank's members
    samples: Samples | None = None  # weight samples of a Bayesian baseline, after training

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.dataset.x_train) / self.cfg.train.batch_size)

    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        return t.steps if t.steps > 0 else t.epochs * self.steps_per_epoch

    @property
    def total_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def build_run(cfg: Config, dataset: Dataset | None = None, comm: Comm | None = None,
              training: bool = True) -> Run:
    """Load data and build likelihood, ensemble, method and optimizer.

    Everything that can fail on bad input fails here, before a run directory
    is created (with ``training``, also a ``[logging]`` backend whose package
    is missing; a finished run is rebuilt with ``training=False``). ``comm``
    defaults to the initialized default process group
    (:func:`diverse.distributed.current`; one process if there is none): the
    ensemble then holds this rank's members only.
    """
    if training:
        check_backend(cfg.logging)
    comm = distributed.current() if comm is None else comm
    device = resolve_device(cfg.train.device)
    device = distributed.rank_device(device) if comm.size > 1 else device
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    likelihood = build_likelihood(cfg.likelihood)
    if cfg.data.augment and len(dataset.input_shape) != 3:
        raise UserError(f"[data] augment = true needs image data (N, C, H, W); {dataset.name!r} "
                        f"has inputs of shape {dataset.input_shape}")
    if likelihood.task != dataset.task:
        want = "gaussian" if dataset.task == "regression" else "categorical"
        raise UserError(
            f"[likelihood] name = {cfg.likelihood.name!r} does not fit the {dataset.task} data "
            f"{cfg.data.name!r}: use name = {want!r}"
        )
    outputs = likelihood.outputs_per_target(dataset.num_outputs)
    probe = build_model(cfg.model, dataset.input_shape, outputs)  # validate, outside the seeding
    distributed.check_sharding(comm, cfg.method, cfg.train.prior_std, probe)
    check_memory(cfg, probe, device, comm)

    spec = METHODS[cfg.method.name]
    ensemble = build_ensemble(cfg, dataset.input_shape, outputs, device, comm)
    t = cfg.train
    update = spec.build(cfg.method, dataset)
    optimizer = build_optimizer(
        list(ensemble.params.values()), t.optimizer, t.lr, momentum=t.momentum,
        nesterov=t.nesterov, betas=(t.betas[0], t.betas[1]), weight_decay=t.weight_decay,
    )
    return Run(cfg, dataset, likelihood, ensemble, update, optimizer, device, comm)


#: Stacked tensors per parameter held in training: weights, gradients, two optimizer moments.
TRAINING_COPIES = 4


def check_memory(cfg: Config, probe: torch.nn.Module, device: torch.device,
                 comm: Comm = SINGLE) -> None:
    """UserError when this rank's members cannot fit: the estimated bytes of weights,
    gradients and optimizer state (:data:`TRAINING_COPIES` × members × parameters ×
    4 bytes, activations not counted) exceed the device's memory."""
    count = sum(p.numel() for p in probe.parameters())
    members = math.ceil(cfg.ensemble.members / comm.size)
    need = TRAINING_COPIES * members * count * 4
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
        where = f"the GPU's {have / 2**30:.1f} GiB"
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
        where = f"this machine's {have / 2**30:.1f} GiB"
    if need > have:
        raise UserError(f"[ensemble] members = {cfg.ensemble.members}: {members} members × "
                        f"{count:,} parameters need about {need / 2**30:,.1f} GiB for weights, "
                        f"gradients and optimizer state, more than {where}; use fewer members "
                        "or a smaller model")


def build_ensemble(cfg: Config, input_shape: tuple[int, ...], outputs: int,
                   device: torch.device, comm: Comm = SINGLE) -> Ensemble:
    """The run's (this rank's) members, initialized from the seed, with the
    method's model wrapper and the configured precision / compilation.

    A generator method (hypernetwork) is one stacked slot producing K members.
    """
    spec = METHODS[cfg.method.name]

    def factory() -> torch.nn.Module:
        module = build_model(cfg.model, input_shape, outputs)
        return module if spec.wrap_model is None else spec.wrap_model(cfg, module)

    slots = 1 if spec.generator else cfg.ensemble.members
    execution = "loop" if spec.generator else cfg.ensemble.execution  # one slot: nothing to vmap
    offset, count = comm.shard(slots)
    ensemble = Ensemble(factory, count, seed=cfg.train.seed, execution=execution,
                        member_offset=offset, device=device)
    t = cfg.train
    precision.configure(ensemble, t.precision, t.compile, cfg.method.name,
                        notify=None if comm.rank == 0 else lambda _text: None)
    return ensemble


PREDICT_SEED = 20_261_123  # Monte Carlo prediction draws are seeded: evaluation is repeatable


def member_outputs(ensemble: Ensemble, x: Tensor, samples: int = 1) -> Tensor:
    """Outputs of every predictive sample ``(S, B, ...)`` in the current mode.

    A plain ensemble gives ``S = M``. A generator slot (hypernetwork) returns
    ``(1, K, B, ...)``, flattened to ``S = K``. With ``samples > 1`` (Bayesian
    layers, MC dropout) the forward is repeated and the draws are stacked
    draw-major: ``[draw 0 of members 0..M-1, draw 1 of members 0..M-1, ...]``,
    so the first M samples hold one draw of every member.
    """
    draws = []
    for _ in range(samples):
        out = ensemble(x)
        if getattr(ensemble.module, "generates_members", False):  # (1, K, B, ...)
            out = out.flatten(0, 1)
        draws.append(out)
    return torch.cat(draws) if samples > 1 else draws[0]


@torch.no_grad()
def predict(ensemble: Ensemble, likelihood: Likelihood, x: Tensor,
            batch_size: int = 1000, samples: int = 1) -> dict[str, Tensor]:
    """Predictions of every sample in eval mode, on CPU: ``{key: (S, N, ...)}``.

    ``S = M × samples`` (see :func:`member_outputs`); random draws use a fixed
    seed (restoring the global RNG afterwards), so repeated calls agree.
    """
    parts: list[dict[str, Tensor]] = []
    devices = [ensemble.device] if ensemble.device.type == "cuda" else []
    with evaluating(ensemble), torch.random.fork_rng(devices=devices):
        torch.manual_seed(PREDICT_SEED)
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(ensemble.device)
            out = member_outputs(ensemble, xb, samples)
            parts.append({k: v.cpu() for k, v in likelihood.predict(out).items()})
    return {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}


def predict_run(run: Run, x: Tensor, batch_size: int = 1000) -> dict[str, Tensor]:
    """:func:`predict_trained` of a run's members (or weight samples) on ``x``."""
    return predict_trained(run.cfg, run.dataset, run.likelihood, run.ensemble, run.samples, x,
                           batch_size)


def predict_trained(cfg: Config, data: Any, likelihood: Likelihood, ensemble: Ensemble,
                    samples: Samples | None, x: Tensor, batch_size: int = 1000
                    ) -> dict[str, Tensor]:
    """:func:`predict` with the method's Monte Carlo draws per member.

    With weight samples (a Bayesian baseline after training) the prediction goes
    through them instead: ``(S, N, ...)``, draw-major (:mod:`diverse.samples`).
    ``data`` needs ``input_shape`` and ``num_outputs`` (a :class:`Dataset` or
    :class:`diverse.data.DataSpec`).
    """
    if samples is not None:
        return sample_set.predict(base_model(cfg, data, likelihood), samples, likelihood, x,
                                  batch_size)
    return predict(ensemble, likelihood, x, batch_size, samples=predict_samples(cfg.method))


#: An epoch whose mean driving/repulsion norm ratio exceeds this gets a warning: the
#: members then move as a deep ensemble's would (seed 003's finding at the exact
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


def held_out_figures(run: Run) -> dict[str, float]:
    """Quick held-out figures logged every ``eval_every`` epochs.

    On the validation split when the data has one (``val_*`` keys), else on the
    test set (``test_*`` keys).
    """
    data = run.dataset
    split, x, y = (("val", data.x_val, data.y_val) if data.has_validation
                   else ("test", data.x_test, data.y_test))
    pred = predict_run(run, x)
    samples = predict_samples(run.cfg.method)  # sharded: every member's predictions
    pred = {k: run.comm.gather_samples(v, samples) for k, v in pred.items()}
    if "probs" in pred:
        return {f"{split}_accuracy": float(metrics.accuracy(pred["probs"], y)),
                f"{split}_nll": float(metrics.nll(pred["probs"], y))}
    means, stds = pred["means"][..., 0], pred["stds"][..., 0]
    return {f"{split}_rmse": float(metrics.rmse(means, y[:, 0])),
            f"{split}_nll": float(metrics.gaussian_mixture_nll(means, stds, y[:, 0]))}


def train(
    run: Run,
    run_dir: Path,
    *,
    resume: bool = False,
    show_progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Train to the end (or from the last checkpoint with ``resume``).

    Returns the per-epoch history. ``on_step(global_step)`` is called after
    every optimizer step (tests use it to interrupt a run).
    """
    cfg, ens, data, comm = run.cfg, run.ensemble, run.dataset, run.comm
    lead = comm.rank == 0  # writes checkpoints, logs and progress
    t = cfg.train
    step, start_epoch, history = 0, 1, []
    if resume:
        model_t, optim_t, manifest = load_checkpoint(run_dir)  # all members: take this rank's
        model_t = distributed.shard_tensors(comm, model_t, cfg.ensemble.members)
        optim_t = distributed.shard_tensors(comm, optim_t, cfg.ensemble.members)
        ens.load_state_tensors({k: v.to(run.device) for k, v in model_t.items()})
        load_optimizer_tensors(run.optimizer, list(ens.params), optim_t)
        ens.execution = manifest["execution"]
        step, start_epoch, history = manifest["step"], manifest["epoch"] + 1, manifest["history"]
    if lead:  # what prediction needs of the data, so a run predicts without it
        write_data_spec(run_dir, data)
    x_train = data.x_train.to(run.device)
    y_train = data.y_train.to(run.device)
    augment = cfg.data.augment
    black = tuple(-m / s for m, s in zip(data.mean, data.std, strict=True))  # padding value
    n, spe, total = len(x_train), run.steps_per_epoch, run.total_steps
    bar = Progress(total, f"train {cfg.method.name} M={cfg.ensemble.members}",
                   enabled=show_progress and lead, start=step)
    tracker = (open_tracker(cfg.logging, run_dir, config_to_dict(cfg))  # [logging] backend
               if lead else NullTracker())
    warned = False  # a quiet run warns once on stderr; a verbose one every epoch
    for epoch in range(start_epoch, run.total_epochs + 1):
        torch.manual_seed(epoch_seed(t.seed, epoch))
        shuffle = torch.Generator().manual_seed(epoch_seed(t.seed, epoch))
        order = torch.randperm(n, generator=shuffle).to(run.device)
        crops = (torch.Generator(device=run.device).manual_seed(epoch_seed(t.seed, epoch) + 1)
                 if augment else None)
        ens.train()
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "fit": 0.0, "nll": 0.0, "count": 0, "steps": 0}
        nll_sum = torch.zeros((), device=run.device)
        diag: dict[str, float] = {}
        for i in range(spe):
            if step >= total:
                break
            idx = order[i * t.batch_size:(i + 1) * t.batch_size]
            lr = t.lr * schedule_factor(t.schedule, step / total, final=t.final_lr_factor)
            set_lr(run.optimizer, lr)
            xb = x_train[idx]
            if crops is not None:
                xb = crop_and_flip(xb, cfg.data.crop_padding, crops, black)
            result = run.update(Step(ens, xb, y_train[idx], run.likelihood, n,
                                     t.prior_std, step / total, step, comm=comm))
            finite_grads = all(bool(torch.isfinite(g).all()) for g in result.grads.values())
            if comm.any(not bool(torch.isfinite(result.loss).all()) or not finite_grads):
                what = "loss" if finite_grads else "update (gradient)"
                kept = (f"the last good checkpoint is epoch {epoch - 1} in {run_dir}/checkpoints"
                        if (Path(run_dir) / "checkpoints" / "latest.json").is_file()
                        else "no checkpoint was written yet")
                raise DivergenceError(
                    f"non-finite {what} at epoch {epoch} step {i + 1} (global step {step + 1}); "
                    f"{kept}"
                )
            for name, p in ens.params.items():
                p.grad = result.grads[name]
            run.optimizer.step()
            step += 1
            fit = run.likelihood.correct(result.outputs, y_train[idx]).mean()
            sums["loss"] += float(result.loss.mean()) * len(idx)
            sums["fit"] += float(fit) * len(idx)
            # the data term only, summed on the device and read once per epoch
            nll_sum = nll_sum + run.likelihood.nll(result.outputs, y_train[idx]).sum() / len(
                result.outputs)
            sums["count"] += len(idx)
            sums["steps"] += 1
            for key, value in result.logs.items():
                diag[key] = diag.get(key, 0.0) + value
            fit_name = "acc" if data.task == "classification" else "neg_mse"
            bar.update(step, epoch=f"{epoch}/{run.total_epochs}",
                       loss=sums["loss"] / sums["count"],
                       **{fit_name: sums["fit"] / sums["count"]},
                       **{k: v for k, v in result.logs.items() if k in PROGRESS_LOGS})
            if on_step is not None:
                on_step(step)
        sums["nll"] = float(nll_sum)
        # sharded: the live figures above are rank 0's members; the epoch's are all members'
        sums["loss"], sums["fit"], sums["nll"] = comm.mean(torch.tensor(
            [sums["loss"], sums["fit"], sums["nll"]], dtype=torch.float64)).tolist()
        # train_loss: the method's own objective per example (what it includes — prior,
        # KL, diversity terms — is the method's); train_nll: the mean member NLL of the
        # batches, the same quantity for every method
        record: dict[str, Any] = {
            "epoch": epoch, "step": step, "lr": lr, "seconds": time.perf_counter() - t0,
            "train_loss": sums["loss"] / max(sums["count"], 1),
            "train_nll": sums["nll"] / max(sums["count"], 1),
            ("train_accuracy" if data.task == "classification" else "train_neg_mse"):
                sums["fit"] / max(sums["count"], 1),
        }
        record.update({f"diag_{k}": v / max(sums["steps"], 1) for k, v in diag.items()})
        last = epoch == run.total_epochs
        if (t.eval_every > 0 and epoch % t.eval_every == 0) or last:
            record.update(held_out_figures(run))
        warning = repulsion_warning(record)
        if warning is not None:
            record["warning"] = warning
        history.append(record)
        tracker.log(epoch, record)
        if spe >= 10 or last or epoch % max(1, run.total_epochs // 20) == 0:
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in record.items() if k != "warning"))
        if warning is not None and lead and show_progress:
            bar.write(f"warning: epoch {epoch}: {warning}")
        elif warning is not None and lead and not warned:
            print(f"diverse: warning: epoch {epoch}: {warning}", file=sys.stderr)
            warned = True
        if epoch % t.checkpoint_every and not last:
            continue
        model_t = distributed.gather_tensors(comm, ens.state_tensors())
        optim_t = distributed.gather_tensors(comm, optimizer_tensors(run.optimizer,
                                                                      list(ens.params)))
        if lead:
            save_checkpoint(
                run_dir, epoch, model_t, optim_t,
                {"config": config_to_dict(cfg), "step": step, "members": cfg.ensemble.members,
                 "execution": ens.resolved_execution(x_train[:t.batch_size]),
                 "history": history},
                keep=t.keep_checkpoints,
            )
        comm.barrier()  # the checkpoint is complete before any rank goes on
    bar.close()
    tracker.close()
    finalize = METHODS[cfg.method.name].finalize
    if finalize is not None:  # Bayesian baselines end in weight samples (diverse.samples)
        run.samples = finalize(run)
        if lead:
            save_samples(run_dir, run.samples, cfg.method.name, config_to_dict(cfg))
    return history


def load_trained(run_dir: Path, cfg: Config, dataset: Dataset | None = None) -> Run:
    """Rebuild a run from its config and load its latest checkpoint."""
    run = build_run(cfg, dataset, training=False)
    model_t, _optim, manifest = load_checkpoint(run_dir)
    run.ensemble.load_state_tensors({k: v.to(run.device) for k, v in model_t.items()})
    run.ensemble.execution = manifest["execution"]
    if has_samples(run_dir):
        run.samples = load_samples(run_dir, run.device)[0]
    return run
