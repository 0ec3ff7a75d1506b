"""Predictions of trained members or weight samples: ``{key: (S, N, ...)}`` on CPU.

One path for every caller — the training loop's held-out figures, evaluation,
``diverse.load(RUN).predict`` — so a loaded run predicts exactly as in process.
Monte Carlo draws are seeded (:data:`PREDICT_SEED`), so predictions repeat.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from diverse.errors import UserError
from diverse.methods.catalog import Method
from diverse.nets import samples as sample_set
from diverse.nets.ensemble import Ensemble, evaluating
from diverse.nets.heterogeneous import GroupSamples, interleave_draws
from diverse.nets.likelihoods import Likelihood
from diverse.nets.samples import Samples

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
        if ensemble.generates_members:  # a generator slot: (1, K, B, ...)
            out = out.flatten(0, 1)
        draws.append(out)
    return torch.cat(draws) if samples > 1 else draws[0]


@torch.no_grad()
def predict(ensemble: Ensemble, likelihood: Likelihood, x: Tensor | Iterable[tuple[Tensor, Tensor]],
            batch_size: int = 1000, samples: int = 1) -> dict[str, Tensor]:
    """Predictions of every sample in eval mode, on CPU: ``{key: (S, N, ...)}``.

    ``x`` is a tensor ``(N, ...)`` (predicted ``batch_size`` at a time) or any
    iterable of ``(x, y)`` batches. ``S = M × samples`` (see
    :func:`member_outputs`); random draws use a fixed seed (restoring the global
    RNG afterwards), so repeated calls agree.
    """
    parts: list[dict[str, Tensor]] = []
    devices = [ensemble.device] if ensemble.device.type == "cuda" else []
    chunks: Iterable[Tensor] = ((x[s:s + batch_size] for s in range(0, len(x), batch_size))
                                if isinstance(x, Tensor) else (b[0] for b in x))
    with evaluating(ensemble), torch.random.fork_rng(devices=devices):
        torch.manual_seed(PREDICT_SEED)
        for xb in chunks:
            out = member_outputs(ensemble, xb.to(ensemble.device), samples)
            parts.append({k: v.cpu() for k, v in likelihood.predict(out).items()})
    if not parts:
        raise UserError("nothing to predict: the inputs are empty")
    return {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}


def predict_run(run: Any, x: Tensor, batch_size: int = 1000) -> dict[str, Tensor]:
    """:func:`predict_trained` of a run's members (or weight samples) on ``x``."""
    return predict_trained(run.method, run.likelihood, run.ensemble, run.samples, x, batch_size)


def predict_trained(method: Method, likelihood: Likelihood, ensemble: Ensemble,
                    samples: Samples | None, x: Tensor, batch_size: int = 1000
                    ) -> dict[str, Tensor]:
    """:func:`predict` with the method's Monte Carlo draws per member.

    With weight samples (a Bayesian baseline after training) the prediction goes
    through them instead, on the plain model (:meth:`Ensemble.plain_model`):
    ``(S, N, ...)``, draw-major (:mod:`diverse.nets.samples`).
    """
    if isinstance(samples, GroupSamples):  # a heterogeneous ensemble: every group's samples
        parts = [sample_set.predict(g.plain_model(), s, likelihood, x, batch_size)
                 for g, s in zip(ensemble.groups, samples.groups, strict=True)]
        return {k: interleave_draws([p[k] for p in parts], samples.draws) for k in parts[0]}
    if samples is not None:
        return sample_set.predict(ensemble.plain_model(), samples, likelihood, x, batch_size)
    return predict(ensemble, likelihood, x, batch_size, samples=method.prediction_draws())


