"""Posterior weight samples of a run: one stacked collection, saved with a manifest.

Every Bayesian baseline ends in weight samples of the *plain* model (the
configured architecture, parameter names as :func:`diverse.nets.models.build_model`
gives them): SWAG, Laplace and mean-field VI draws, SGHMC samples, MC-dropout
masked weights (:data:`diverse.methods.catalog.METHODS`, ``finalize``); a deep
ensemble's members are collected as they are (:func:`collect_members`).
Because all methods share one naming, posteriors from different methods can be
compared weight for weight (MMD, symmetry removal: :mod:`diverse.app.posterior`).

A :class:`Samples` holds ``S`` samples stacked ``{name: (S, *shape)}``, ordered
draw-major as :func:`diverse.app.train.member_outputs`: sample ``d·M + m`` is draw
``d`` of member ``m``, so the first M samples hold one draw of every member and
:func:`diverse.evaluation.evaluate.member_probs` regroups predictions per member. Each
sample also carries its member's buffers (BatchNorm statistics).

On disk (``RUN/samples/``), written atomically (temp file + rename, the
manifest last): ``samples.safetensors`` with keys ``params/<name>``,
``buffers/<name>`` and ``member`` (int64 ``(S,)``), and ``manifest.json``
(method, count, members, draws, the member of each sample, parameter shapes,
the run config, versions and the SHA-256 of the tensor file, checked on load).

Prediction through samples (:func:`predict`) runs the plain model with each
sample's weights by ``torch.func.functional_call`` under ``vmap``, in chunks
of samples, in eval mode: ``(S, B, ...)`` outputs like an ensemble's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call, vmap

from diverse.checkpoint import atomic_save_tensors, atomic_write_json, sha256, versions
from diverse.errors import UserError
from diverse.nets.models import build_model

SAMPLES_DIR = "samples"
TENSOR_FILE = "samples.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "diverse-samples"

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Samples:
    """``S`` weight samples of the plain model, draw-major.

    Attributes:
        params: ``{name: (S, *shape)}``, the plain model's parameter names.
        buffers: ``{name: (S, *shape)}``, the plain model's buffers (e.g.
            BatchNorm running statistics) of each sample's member; ``{}`` if none.
        member: ``(S,)`` int64, the member each sample was drawn from.
    """

    params: Params
    buffers: Params
    member: Tensor

    @property
    def count(self) -> int:
        """S, the number of samples."""
        return int(self.member.shape[0])

    @property
    def members(self) -> int:
        """M, the number of members the samples come from."""
        return int(self.member.max()) + 1 if self.count else 0

    @property
    def draws(self) -> int:
        """Draws per member, ``S / M``."""
        return self.count // max(self.members, 1)

    def to(self, device: torch.device | str) -> Samples:
        return Samples({k: v.to(device) for k, v in self.params.items()},
                       {k: v.to(device) for k, v in self.buffers.items()},
                       self.member.to(device))


def draw_major_members(members: int, draws: int) -> Tensor:
    """``(draws·members,)`` member index of each draw-major sample: ``[0..M-1, 0..M-1, ...]``."""
    return torch.arange(members * draws) % members


def stack_draws(draws: Sequence[Mapping[str, Tensor]]) -> Params:
    """Per-draw stacked params ``[{name: (M, *shape)}] * D`` → draw-major ``{name: (D·M, ...)}``."""
    if not draws:
        raise ValueError("stack_draws needs at least one draw")
    return {k: torch.cat([d[k] for d in draws]) for k in draws[0]}


def base_model(cfg: Any, dataset: Any, likelihood: Any) -> nn.Module:
    """The plain model of a run config (no method wrapper), in eval mode.

    Built under a forked global RNG so building it never shifts a run's random
    stream; only its structure is used (its weights come from the samples).
    """
    outputs = likelihood.outputs_per_target(dataset.num_outputs)
    with torch.random.fork_rng(devices=[]):
        return build_model(cfg.model, dataset.input_shape, outputs).eval()


def member_buffers(skeleton: nn.Module, buffers: Mapping[str, Tensor], member: Tensor) -> Params:
    """The plain model's buffers for each sample: ``{name: buffers[name][member]}``.

    ``buffers`` are an ensemble's stacked buffers ``(M, ...)`` (which may hold
    more entries, e.g. SWAG moments; only the skeleton's own names are kept).
    """
    return {name: buffers[name][member.to(buffers[name].device)]
            for name, _ in skeleton.named_buffers() if name in buffers}


def samples_from_draws(skeleton: nn.Module, draws: Sequence[Mapping[str, Tensor]],
                       buffers: Mapping[str, Tensor]) -> Samples:
    """:class:`Samples` from ``D`` draws of all ``M`` members ``[{name: (M, *shape)}] * D``.

    Checks that the draws hold exactly the plain model's parameters with its shapes.
    """
    params = stack_draws(draws)
    check_params(skeleton, params)
    members = next(iter(params.values())).shape[0] // len(draws)
    member = draw_major_members(members, len(draws))
    return Samples(params, member_buffers(skeleton, buffers, member), member)


def collect_members(skeleton: nn.Module, params: Mapping[str, Tensor],
                    buffers: Mapping[str, Tensor]) -> Samples:
    """An ensemble's members as samples (``S = M``, one draw each).

    ``params``/``buffers``: stacked ``(M, ...)``, e.g. ``Ensemble.params`` and
    ``Ensemble.member_buffers`` of a deep ensemble.
    """
    return samples_from_draws(skeleton, [{k: v.detach() for k, v in params.items()}], buffers)


def check_params(skeleton: nn.Module, params: Mapping[str, Tensor]) -> None:
    """UserError unless ``params`` has exactly the skeleton's parameter names and shapes
    (less its shared tensors, ``skeleton.diverse_shared``: an ensemble form's backbone,
    which the skeleton holds itself)."""
    shared = set(getattr(skeleton, "diverse_shared", ()))
    expected = {k: tuple(v.shape) for k, v in skeleton.named_parameters() if k not in shared}
    got = {k: tuple(v.shape[1:]) for k, v in params.items()}
    if got != expected:
        bad = sorted(set(expected) ^ set(got)) or [k for k in expected if got[k] != expected[k]]
        raise UserError(
            f"weight samples do not match the model: parameter {bad[0]!r} expected shape "
            f"{expected.get(bad[0], 'none')}, found {got.get(bad[0], 'none')}"
        )


def flatten(samples: Samples, skeleton: nn.Module) -> Tensor:
    """``(S, D)``: each sample's parameters concatenated in the skeleton's order."""
    return torch.cat([samples.params[k].reshape(samples.count, -1)
                      for k, _ in skeleton.named_parameters()], dim=1)


# ------------------------------------------------------------------------ prediction


def sample_outputs(skeleton: nn.Module, samples: Samples, x: Tensor, chunk: int = 100) -> Tensor:
    """Outputs of every sample on a shared input ``x: (B, ...)`` → ``(S, B, ...)``.

    The skeleton runs in its current mode (eval for prediction) with each
    sample's parameters and buffers, ``chunk`` samples at a time under ``vmap``.
    """

    # an ensemble form's shared tensors (its backbone) come from the skeleton itself
    strict = not getattr(skeleton, "diverse_shared", ())

    def one(p: Params, b: Params) -> Tensor:
        return functional_call(skeleton, (p, b), (x,), strict=strict)

    batched = vmap(one, in_dims=(0, 0))
    outs = []
    for start in range(0, samples.count, chunk):
        part = slice(start, start + chunk)
        outs.append(batched({k: v[part] for k, v in samples.params.items()},
                            {k: v[part] for k, v in samples.buffers.items()}))
    return torch.cat(outs)


@torch.no_grad()
def predict(skeleton: nn.Module, samples: Samples, likelihood: Any, x: Tensor,
            batch_size: int = 1000) -> dict[str, Tensor]:
    """Predictions of every sample on CPU: ``{key: (S, N, ...)}`` (as ``train.predict``).

    Deterministic: the samples are fixed weights and the model runs in eval mode.
    """
    device = next(iter(samples.params.values())).device
    skeleton = skeleton.to(device).eval()
    parts: list[dict[str, Tensor]] = []
    for start in range(0, len(x), batch_size):
        out = sample_outputs(skeleton, samples, x[start:start + batch_size].to(device))
        parts.append({k: v.cpu() for k, v in likelihood.predict(out).items()})
    return {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}


# ----------------------------------------------------------------------------- disk


def save_samples(run_dir: Path, samples: Samples, method: str,
                 config: Mapping[str, Any] | None = None) -> Path:
    """Write ``RUN/samples/samples.safetensors`` and ``manifest.json``; return the manifest path."""
    folder = Path(run_dir) / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {**{f"params/{k}": v for k, v in samples.params.items()},
               **{f"buffers/{k}": v for k, v in samples.buffers.items()},
               "member": samples.member.to(torch.int64)}
    digest = atomic_save_tensors(folder / TENSOR_FILE, tensors,
                                 {"format": FORMAT, "method": method})
    manifest = {
        "format": FORMAT,
        "method": method,
        "count": samples.count,
        "members": samples.members,
        "draws": samples.draws,
        "member": samples.member.tolist(),
        "params": {k: list(v.shape[1:]) for k, v in samples.params.items()},
        "buffers": {k: list(v.shape[1:]) for k, v in samples.buffers.items()},
        "config": dict(config or {}),
        "versions": versions(),
        "file": {"name": TENSOR_FILE, "sha256": digest},
    }
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    return folder / MANIFEST_FILE


def has_samples(run_dir: Path) -> bool:
    return (Path(run_dir) / SAMPLES_DIR / MANIFEST_FILE).is_file()


def load_samples(run_dir: Path, device: torch.device | str = "cpu"
                 ) -> tuple[Samples, dict[str, Any]]:
    """Read ``RUN/samples``: ``(samples, manifest)``; missing or corrupt files are a UserError."""
    folder = Path(run_dir) / SAMPLES_DIR
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise UserError(f"no weight samples in {str(folder)!r} (missing {MANIFEST_FILE})")
    manifest = json.loads(manifest_path.read_text())
    path = folder / manifest["file"]["name"]
    if not path.is_file() or sha256(path) != manifest["file"]["sha256"]:
        raise UserError(f"samples file {str(path)!r} is missing or corrupt (hash mismatch)")
    raw = load_file(path)
    params = {k[len("params/"):]: v for k, v in raw.items() if k.startswith("params/")}
    buffers = {k[len("buffers/"):]: v for k, v in raw.items() if k.startswith("buffers/")}
    return Samples(params, buffers, raw["member"]).to(device), manifest


def save_run_samples(run_dir: Path, samples: Any, method: str,
                     config: Mapping[str, Any] | None = None) -> None:
    """:func:`save_samples`, or for a heterogeneous ensemble's ``GroupSamples`` every group's
    in ``RUN/samples/group<i>/``."""
    groups = getattr(samples, "groups", None)
    if groups is None:
        save_samples(run_dir, samples, method, config)
        return
    for i, part in enumerate(groups):
        save_samples(Path(run_dir) / SAMPLES_DIR / f"group{i}", part, method, config)


def load_run_samples(run_dir: Path, device: torch.device | str = "cpu") -> Any:
    """The weight samples :func:`save_run_samples` wrote, or None when there are none."""
    if has_samples(run_dir):
        return load_samples(run_dir, device)[0]
    folder = Path(run_dir) / SAMPLES_DIR
    parts = []
    while has_samples(folder / f"group{len(parts)}"):
        parts.append(load_samples(folder / f"group{len(parts)}", device)[0])
    if not parts:
        return None
    from diverse.nets.heterogeneous import GroupSamples

    return GroupSamples(tuple(parts))
