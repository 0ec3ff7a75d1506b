"""One training step — the single update that :func:`diverse.fit`, the Lightning adapter
and a user's own loop all call.

    result = train_step(ensemble, method, optimizer, (x, y), target,
                        progress=i / total, index=i, state=state)
    state = result.state

The method computes the gradient of its objective on the member parameters (or moves
them itself: a sampler returns ``grads = None``); shared trainable tensors (BatchEnsemble's
slow weights, a trainable backbone) get the gradient of the members' summed negative log
posterior — from the method's own backward when it gives one (the deep ensemble), else
from one more forward and backward of the target; then one optimizer step moves all of
them. The method's state (:meth:`~diverse.methods.catalog.Method.init_state`) goes in
and comes back in ``result.state``.

Owning the loop (learning-rate schedule, logging, checkpoints) is then the caller's:
posteriors' and optax's ``update(state, batch)`` in PyTorch form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diverse.methods.base import LogPosterior, Step, StepResult, member_gradients, set_grads
from diverse.methods.catalog import Method
from diverse.nets.distributed import SINGLE, Comm
from diverse.nets.ensemble import SHARED, Ensemble, Params


def shared_gradients(ensemble: Ensemble, target: LogPosterior, x: Tensor, y: Tensor) -> Params:
    """``∂/∂v [Σ_m −log p(w_m, v | batch)/N]`` for every shared trainable tensor ``v``: the
    members' summed negative log posterior (the prior on ``v`` counted once)."""
    shared = ensemble.shared_trainable
    params = {k: v.detach() for k, v in ensemble.params.items()}
    outputs = ensemble.apply(params, x)
    objective = target.loss(outputs, y, params).sum() + target.shared_prior(shared).to(outputs)
    return member_gradients(objective, shared)


def train_step(
    ensemble: Ensemble,
    method: Method,
    optimizer: torch.optim.Optimizer | None,
    batch: tuple[Tensor, Tensor],
    target: LogPosterior,
    *,
    progress: float = 0.0,
    index: int = 0,
    state: dict[str, Tensor] | None = None,
    comm: Comm = SINGLE,
    check: Callable[[StepResult], None] | None = None,
) -> StepResult:
    """One update of every member: the method's gradient, then one optimizer step.

    Args:
        ensemble: the members (:meth:`Method.ensemble`), in training mode.
        method: a built :class:`~diverse.methods.catalog.Method`.
        optimizer: over ``ensemble.trainable.values()`` (member parameters, then the
            shared trainable ones); None only for a sampler (it moves the weights itself).
        batch: ``(x (B, ...), y (B, ...))``, moved to the ensemble's device here.
        target: the log posterior (likelihood, N, prior σ), built once per run.
        progress: ``step / total_steps`` in ``[0, 1)`` (annealing, SWAG's start, cycles).
        index: the global step number (0-based).
        state: the method's state (``method.init_state(ensemble)`` at the start).
        comm: the member sharding (default one process).
        check: called with the method's result before the optimizer step (the loop's
            divergence stop: a non-finite update is never applied).

    Returns:
        :class:`~diverse.methods.base.StepResult`: per-member loss ``(M,)``, outputs
        ``(M, B, K)``, the gradients handed to the optimizer, diagnostics, and ``state``.
    """
    device = ensemble.device
    x = batch[0].to(device, non_blocking=True)
    y = batch[1].to(device, non_blocking=True)
    state = {} if state is None else state
    result = method.update(Step(ensemble, x, y, target.likelihood, target.n_train,
                                target.prior_std, progress, index, comm, state))
    result.state = state
    if check is not None:
        check(result)
    if result.grads is None:  # a sampler has moved θ itself
        return result
    if optimizer is None:
        raise ValueError(f"train_step: method {method.name!r} needs an optimizer")
    grads = dict(result.grads)
    if ensemble.shared_trainable:
        shared = result.shared_grads
        if shared is None:
            shared = shared_gradients(ensemble, target, x, y)
        grads.update({SHARED + k: g for k, g in shared.items()})
    set_grads(ensemble.trainable, grads)
    optimizer.step()
    return result
