"""The CLI's training run: a config → data, ensemble and method → :func:`diverse.fit`.

:func:`build_run` loads the configured data set, builds the likelihood, the
members of the configured model (wrapped as the method needs), the method and
its training batches (:class:`diverse.app.loop.TensorBatches`: a seeded permutation
per epoch, augmentation when configured); :func:`train` runs the one training
loop, :func:`diverse.fit.fit`, on them. Everything that can fail on bad input
fails in :func:`build_run`, before a run directory exists.

Determinism: initialization uses ``(seed, member)``; each epoch reseeds the
global generator (dropout masks) and the shuffling generator from
``(seed, epoch)``. A checkpoint is written atomically after every epoch (and
every ``checkpoint_every_steps`` steps), so a run killed at any point resumes
from the last checkpoint and reaches exactly (bit for bit on CPU) the
parameters of an uninterrupted run.

Sharded over processes (:mod:`diverse.nets.distributed`, launched by torchrun),
each rank trains its share of the members on the same minibatches; rank 0
gathers all members into the usual checkpoint and writes history and logs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diverse import rundir
from diverse.app.checkpointing import split_state
from diverse.app.config import Config, config_to_dict, config_to_toml
from diverse.app.loop import (
    REPULSION_WARNING_RATIO,
    TensorBatches,
    as_callback,
    epoch_seed,
    fit,
    repulsion_warning,
    resolve_device,
)
from diverse.app.tracking import check_backend, open_tracker
from diverse.checkpoint import load_checkpoint
from diverse.data.datasets import Dataset, load_dataset, write_data_spec
from diverse.errors import UserError
from diverse.evaluation.prediction import (
    PREDICT_SEED,
    member_outputs,
    predict,
    predict_run,
    predict_trained,
)
from diverse.methods.base import Step, StepResult, TrainingData
from diverse.methods.catalog import METHODS, Method, check_training
from diverse.nets import distributed, precision
from diverse.nets.distributed import SINGLE, Comm
from diverse.nets.ensemble import Ensemble
from diverse.nets.likelihoods import Likelihood, build_likelihood
from diverse.nets.models import build_model
from diverse.nets.samples import Samples, has_samples, load_samples

__all__ = ["PREDICT_SEED", "REPULSION_WARNING_RATIO", "Run", "build_ensemble", "build_run",
           "epoch_seed", "load_trained", "member_outputs", "predict", "predict_run",
           "predict_trained", "repulsion_warning", "resolve_device", "train", "write_run_config"]


@dataclass
class Run:
    """The live objects of a CLI run, built from a config."""

    cfg: Config
    dataset: Dataset
    likelihood: Likelihood
    ensemble: Ensemble
    method: Method
    batches: TensorBatches
    device: torch.device
    comm: Comm = SINGLE  # the member sharding; the ensemble holds this rank's members
    samples: Samples | None = None  # weight samples of a Bayesian baseline, after training
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # the method's state

    @property
    def update(self) -> Callable[[Step], StepResult]:
        return self.method.update

    @update.setter
    def update(self, fn: Callable[[Step], StepResult]) -> None:
        self.method.update = fn

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        return t.steps if t.steps > 0 else t.epochs * self.steps_per_epoch

    @property
    def total_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def build_run(cfg: Config, dataset: Dataset | None = None, comm: Comm | None = None,
              training: bool = True) -> Run:
    """Load data and build likelihood, ensemble, method and training batches.

    Everything that can fail on bad input fails here, before a run directory
    is created (with ``training``, also a ``[logging]`` backend whose package
    is missing; a finished run is rebuilt with ``training=False``). ``comm``
    defaults to the initialized default process group
    (:func:`diverse.nets.distributed.current`; one process if there is none): the
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
    spec = METHODS[cfg.method.name]
    distributed.check_sharding(comm, cfg.method, cfg.train.prior_std, probe,
                               shardable=spec.shardable, function_space=spec.function_space,
                               allowed=tuple(n for n, s in METHODS.items() if s.shardable))
    check_memory(cfg, probe, device, comm)
    check_training(cfg.method.name, cfg.train.prior_std, cfg.train.weight_decay)
    method = Method(cfg.method, TrainingData.of(dataset))
    ensemble = build_ensemble(cfg, dataset.input_shape, outputs, device, comm, method)
    pad = tuple(-m / s for m, s in zip(dataset.mean, dataset.std, strict=True))  # black
    batches = TensorBatches(dataset.x_train.to(device), dataset.y_train.to(device),
                            cfg.train.batch_size, augment=cfg.data.augment,
                            crop_padding=cfg.data.crop_padding, pad_value=pad)
    return Run(cfg, dataset, likelihood, ensemble, method, batches, device, comm)


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


def model_description(cfg: Config) -> dict[str, Any]:
    """What :func:`diverse.load` rebuilds a CLI run from: the same description a
    :func:`diverse.fit` run writes to ``model.json`` (method, members, seed, form,
    likelihood), with the ``[model]`` section in place of an importable factory and the
    run's precision."""
    d = config_to_dict(cfg)
    return {"format": "diverse-run", "method": d["method"], "members": cfg.ensemble.members,
            "seed": cfg.train.seed, "execution": cfg.ensemble.execution,
            "members_as": cfg.ensemble.form().describe(), "input_dtype": "float32",
            "likelihood": d["likelihood"], "model": d["model"],
            "precision": [cfg.train.precision, cfg.train.compile], "factory": None,
            "file": None}


def write_run_config(run_dir: Path, cfg: Config) -> None:
    """A CLI run's ``config.toml`` and its ``model.json`` (:func:`model_description`), both
    atomically: the one place they are written, so they never disagree."""
    rundir.write_text(run_dir, rundir.CONFIG, config_to_toml(cfg))
    rundir.write_json(run_dir, rundir.MODEL, model_description(cfg))


def build_ensemble(cfg: Config, input_shape: tuple[int, ...], outputs: int,
                   device: torch.device, comm: Comm = SINGLE,
                   method: Method | None = None) -> Ensemble:
    """The run's (this rank's) members of the configured model, initialized from the
    seed, made by the method (:meth:`Method.ensemble`: its model wrapper, a
    generator's single slot), with the configured precision / compilation."""
    method = method if method is not None else Method(cfg.method)

    def factory() -> nn.Module:
        return build_model(cfg.model, input_shape, outputs)

    offset, count = comm.shard(cfg.ensemble.members)
    # a generator (hypernetwork) is one slot generating all K members
    members = cfg.ensemble.members if method.spec.generator else count
    ensemble = method.ensemble(factory, members, seed=cfg.train.seed,
                               execution=cfg.ensemble.execution, device=device,
                               member_offset=0 if method.spec.generator else offset,
                               members_as=cfg.ensemble.form())
    t = cfg.train
    precision.configure(ensemble, t.precision, t.compile,
                        double_backward=method.spec.double_backward, name=method.name,
                        notify=None if comm.rank == 0 else lambda _text: None)
    return ensemble


def train(
    run: Run,
    run_dir: Path,
    *,
    resume: bool = False,
    show_progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Train to the end (or from the last checkpoint with ``resume``) with :func:`fit`.

    Returns the per-epoch history. ``on_step(global_step)`` is called after
    every optimizer step (tests use it to interrupt a run). Held-out figures
    are on the validation split when the data has one (``val_*``), else on the
    test set (``test_*``).
    """
    cfg, data, comm = run.cfg, run.dataset, run.comm
    lead = comm.rank == 0
    if lead:  # what prediction needs of the data, so a run predicts without it
        write_data_spec(run_dir, data)
    split, vx, vy = (("val", data.x_val, data.y_val) if data.has_validation
                     else ("test", data.x_test, data.y_test))
    record = config_to_dict(cfg)
    tracker = open_tracker(cfg.logging, run_dir, record) if lead else None
    result = fit(run.ensemble, run.method, run.batches, n_train=len(data.x_train),
                 likelihood=run.likelihood, train=cfg.train, val=(vx, vy), val_name=split,
                 run_dir=run_dir, resume=resume,
                 callbacks=[as_callback(on_step)] if on_step is not None else [],
                 show_progress=show_progress, tracker=tracker, run_record=record, comm=comm)
    if result.samples is not None:
        run.samples = result.samples
    run.state = result.state
    return result.history


def load_trained(run_dir: Path, cfg: Config, dataset: Dataset | None = None) -> Run:
    """Rebuild a run from its config and load its latest checkpoint."""
    run = build_run(cfg, dataset, training=False)
    model_t, _optim, manifest = load_checkpoint(run_dir)
    run.ensemble.load_state_tensors({k: v.to(run.device) for k, v in model_t.items()})
    run.state = split_state(model_t, run.device)
    run.ensemble.execution = manifest["execution"]
    if has_samples(run_dir):
        run.samples = load_samples(run_dir, run.device)[0]
    return run
