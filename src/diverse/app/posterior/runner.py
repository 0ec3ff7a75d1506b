"""Running the posterior study: train or reuse every run, canonicalize the samples, MMD
to the reference (:mod:`diverse.app.posterior`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from diverse import metrics, rundir
from diverse.app.config import (
    Config,
    config_to_dict,
    config_to_toml,
)
from diverse.app.posterior.config import (
    PosteriorConfig,
    RunSpec,
    _run_config,
    hmc_reference_config,
    reference_config,
    run_specs,
)
from diverse.app.posterior.tables import write_results
from diverse.checkpoint import atomic_save_tensors, atomic_write_json, atomic_write_text
from diverse.errors import UserError
from diverse.math.mmd import mmd
from diverse.nets.samples import (
    Samples,
    base_model,
    collect_members,
    flatten,
    has_samples,
    load_samples,
    save_samples,
)
from diverse.nets.symmetry import canonical_scaling, remove_symmetries
from diverse.progress import Progress

# ----------------------------------------------------------------------------- running


def _same_config(run_dir: Path, cfg: Config) -> bool:
    path = rundir.path(run_dir, rundir.CONFIG)
    return not path.exists() or path.read_text() == config_to_toml(cfg)


def train_or_reuse(cfg: Config, run_dir: Path, dataset: Any, show_progress: bool
                   ) -> tuple[Any, Samples]:
    """Train (or resume) the run in ``run_dir`` to its weight samples; reuse finished ones.

    Returns ``(run, samples)``; a deep ensemble's members are saved as its samples.
    A folder holding a run of another config is a UserError.
    """
    from diverse.app.train import build_run, load_trained, train, write_run_config

    if not _same_config(run_dir, cfg):
        raise UserError(f"{str(run_dir)!r} holds a run with another config; delete it or "
                        f"choose another --out")
    if has_samples(run_dir) and (run_dir / "checkpoints" / "latest.json").is_file():
        run = load_trained(run_dir, cfg, dataset)
        samples, _ = load_samples(run_dir, run.device)
        return run, samples
    run = build_run(cfg, dataset)
    resume = (run_dir / "checkpoints" / "latest.json").is_file()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_run_config(run_dir, cfg)
    train(run, run_dir, resume=resume, show_progress=show_progress)
    if run.samples is None:  # deep ensemble: the members are the samples
        skeleton = base_model(cfg, run.dataset, run.likelihood)
        run.samples = collect_members(skeleton, run.ensemble.params, run.ensemble.member_buffers)
        save_samples(run_dir, run.samples, cfg.method.name, config_to_dict(cfg))
    return run, run.samples


def canonical(skeleton: nn.Module, samples: Samples, scaling: str) -> Tensor:
    """``(S, D)`` flattened weights after symmetry removal (``scaling``, then sorting).

    The min-mass solver occasionally stops a hair above its gradient tolerance
    (SciPy's trust-ncg at the limit of float64 precision) and raises; such a
    sample is solved again from its unit-norm rescaling, a different point of
    the same scaling orbit, whose min-mass representative is the same (the
    minimum over the orbit is unique).
    """
    state = {**samples.params, **samples.buffers}
    try:
        out = remove_symmetries(skeleton, state, scaling)
    except RuntimeError:
        if scaling != "min-mass":
            raise
        parts = []
        for i in range(samples.count):
            one = {k: v[i:i + 1] for k, v in state.items()}
            try:
                parts.append(remove_symmetries(skeleton, one, scaling))
            except RuntimeError:
                start = canonical_scaling(skeleton, one, "unit-norm")
                parts.append(remove_symmetries(skeleton, start, scaling))
        out = {k: torch.cat([p[k] for p in parts]) for k in state}
    return flatten(Samples({k: out[k] for k in samples.params}, {}, samples.member), skeleton)


def uncertainty_row(run: Any, ood: str) -> dict[str, float]:
    """Test-set and OOD figures of a run through its predictive samples."""
    from diverse.app.train import predict_run

    data = run.dataset
    probs = predict_run(run, data.x_test)["probs"]
    probs_out = predict_run(run, data.ood[ood])["probs"]
    fig = metrics.classification_metrics(probs, data.y_test)
    detect = metrics.ood_metrics(probs, probs_out, score="entropy")
    return {"accuracy": fig["accuracy"], "ece": fig["ece"], "ace": fig["ace"],
            "brier": fig["brier"], "nll": fig["nll"], "aupr": detect["aupr_out"],
            "fpr95": detect["fpr95"], "mi_in": fig["mutual_information"],
            "mi_out": float(metrics.mutual_information(probs_out).mean())}


def mmd_value(x: Tensor, y: Tensor) -> float:
    """The aggregate MMD² (:func:`diverse.math.mmd.mmd`) of two weight samples, in float64."""
    return float(mmd(x.double().cpu(), y.double().cpu())["aggregate"])


def _reference(pc: PosteriorConfig, out: Path, dataset: Any, show: bool
               ) -> tuple[nn.Module, Tensor, Tensor]:
    """The reference's skeleton and flattened weights ``(R, D)`` before and after removal."""
    cfg = reference_config(pc)
    folder = out / "reference"
    run, samples = train_or_reuse(cfg, folder, dataset, show)
    skeleton = base_model(cfg, run.dataset, run.likelihood)
    return skeleton, flatten(samples, skeleton).cpu(), _canonical_cached(
        folder, skeleton, samples, pc.study.scaling)


def _canonical_cached(folder: Path, skeleton: nn.Module, samples: Samples, scaling: str
                      ) -> Tensor:
    """:func:`canonical` of a reference's samples, cached in ``folder``."""
    cache = folder / f"canonical-{scaling}.safetensors"
    if cache.is_file():
        return load_file(cache)["weights"]
    canon = canonical(skeleton, samples.to("cpu"), scaling)
    atomic_save_tensors(cache, {"weights": canon}, {"scaling": scaling})
    return canon


def _hmc_reference(pc: PosteriorConfig, out: Path, dataset: Any, skeleton: nn.Module,
                   show: bool) -> tuple[Tensor, Tensor]:
    """The HMC reference's flattened samples ``(R, D)`` before and after symmetry removal."""
    folder = out / "hmc-reference"
    _run, samples = train_or_reuse(hmc_reference_config(pc), folder, dataset, show)
    return flatten(samples, skeleton).cpu(), _canonical_cached(folder, skeleton, samples,
                                                               pc.study.scaling)


def _check_study(pc: PosteriorConfig, specs: list[RunSpec], dataset: Any) -> None:
    """Fail before any training: data kind, OOD set, symmetry removal, every run's build."""
    from diverse.app.train import build_run

    if dataset.task != "classification":
        raise UserError(f"[data] name = {dataset.name!r}: the posterior study needs a "
                        f"classification data set")
    seen = set()
    for spec in specs:
        if (spec.method, spec.mode) not in seen:
            seen.add((spec.method, spec.mode))
            build_run(spec.cfg, dataset)  # wrappers and method options fail here
    if pc.study.hmc_reference:
        build_run(hmc_reference_config(pc), dataset)
    ref = reference_config(pc)
    run = build_run(_run_config(pc, "de", 1, 0, None, ()), dataset)
    skeleton = base_model(ref, dataset, run.likelihood)
    remove_symmetries(skeleton, {k: v.detach() for k, v in run.ensemble.params.items()},
                      pc.study.scaling)


def run_study(pc: PosteriorConfig, out: Path, show_progress: bool = True) -> Path:
    """Run (or resume) the whole study into ``out``; returns ``out/results.md``."""
    from diverse.data.datasets import load_dataset

    s = pc.study
    specs = run_specs(pc)
    dataset = load_dataset(reference_config(pc).data)
    _check_study(pc, specs, dataset)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(
        {"study": asdict(s), "run": pc.run, "overrides": pc.overrides}, indent=2) + "\n")
    skeleton, ref_flat, ref_canon = _reference(pc, out, dataset, show_progress)
    floor = {"mmd": mmd_value(ref_flat[:s.samples], ref_flat[s.samples:]),
             "mmd_ns": mmd_value(ref_canon[:s.samples], ref_canon[s.samples:])}
    hmc = _hmc_reference(pc, out, dataset, skeleton, show_progress) if s.hmc_reference else None
    if hmc is not None:  # the trained reference against HMC: how far apart the two are
        floor.update(reference_to_hmc=mmd_value(ref_flat, hmc[0]),
                     reference_to_hmc_ns=mmd_value(ref_canon, hmc[1]))
    bar = Progress(len(specs), "posterior study", enabled=show_progress)
    rows, projections = [], {}
    for i, spec in enumerate(specs):
        run_dir = out / "runs" / spec.name
        row_path = run_dir / "row.json"
        reuse = row_path.is_file() and has_samples(run_dir) and _same_config(run_dir, spec.cfg)
        if reuse and spec.seed > 0:  # seed 0's samples are needed again for the plots
            rows.append(json.loads(row_path.read_text()))
        else:
            run, samples = train_or_reuse(spec.cfg, run_dir, dataset, False)
            samples = samples.to("cpu")
            flat = flatten(samples, skeleton)
            canon = canonical(skeleton, samples, s.scaling)
            projections[(spec.method, spec.mode)] = (flat, canon)
            if reuse:
                rows.append(json.loads(row_path.read_text()))
            else:
                row = {"method": spec.method, "mode": spec.mode, "seed": spec.seed,
                       "members": spec.members, "samples": samples.count,
                       "mmd": mmd_value(flat, ref_flat), "mmd_ns": mmd_value(canon, ref_canon),
                       **uncertainty_row(run, s.ood)}
                if hmc is not None:
                    row.update(mmd_hmc=mmd_value(flat, hmc[0]),
                               mmd_hmc_ns=mmd_value(canon, hmc[1]))
                atomic_write_json(row_path, row)
                rows.append(row)
        bar.update(i + 1, run=spec.name, mmd=rows[-1]["mmd"])
    bar.close()
    return write_results(out, rows, floor, ref_flat, ref_canon, projections, s)


