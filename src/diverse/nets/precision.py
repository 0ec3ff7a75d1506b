"""Opt-in speed settings of the member forward: bf16 autocast and torch.compile.

``[train] precision = "bf16"`` runs every member's forward under
``torch.autocast(device_type, dtype=torch.bfloat16)`` and returns float32
outputs; parameters, gradients, optimizer state and all interaction terms
(kernels, score estimators, input-gradient metrics) stay in float32 — only the
network's matrix products and convolutions run in bf16. Allowed on CPU too
(PyTorch's CPU autocast supports bf16; fast only on CPUs with bf16 units).

``[train] compile = true`` compiles the vectorized (``vmap``) member forward
with ``torch.compile``; the execution becomes ``"vmap"`` (a ``"loop"``
execution is refused). The compiled function returns the same numbers as the
eager one up to the reordering of float operations. ``torch.compile`` cannot
differentiate its graphs twice, so methods that backpropagate through
gradients (FoRDE's input gradients) run eagerly, with a one-line notice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from diverse.errors import UserError
from diverse.nets.ensemble import Ensemble

PRECISIONS = ("fp32", "bf16")
#: methods whose update differentiates through gradients (double backward)
#: torch.compile backend: a name or a callable ``(GraphModule, inputs) -> callable``
COMPILE_BACKEND: str | Callable[..., Any] = "inductor"


def autocast_forward(module: nn.Module, device_type: str) -> nn.Module:
    """Make ``module``'s forward run under bf16 autocast, in place; returns it.

    The module's class is replaced by a subclass whose ``forward`` wraps the
    original: parameter names, hooks and ``state_dict`` are unchanged, and
    copies (``copy.deepcopy``) keep the behaviour. Floating outputs are cast
    back to float32.
    """
    base = type(module)
    if getattr(base, "_autocast_device", None) is not None:
        return module

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = base.forward(self, *args, **kwargs)
        return out.float() if isinstance(out, Tensor) and out.is_floating_point() else out

    module.__class__ = type(f"Bf16{base.__name__}", (base,),
                            {"forward": forward, "_autocast_device": device_type})
    return module


def compile_ensemble(ensemble: Ensemble, backend: str | Callable[..., Any] | None = None) -> None:
    """Compile the ensemble's vectorized forwards (shared and per-member input)."""
    backend = backend or COMPILE_BACKEND
    # Ensemble keeps one vmapped function per input layout; compiling them leaves
    # the loop execution and the feature capture (forward hooks) eager.
    ensemble._vmapped = {shared: torch.compile(fn, backend=backend)
                         for shared, fn in ensemble._vmapped.items()}
    ensemble.execution = "vmap"


def configure(ensemble: Ensemble, precision: str, compile: bool, *,
              double_backward: bool = False, name: str = "the method",
              notify: Callable[[str], None] | None = None) -> None:
    """Apply ``[train] precision`` and ``[train] compile`` to a freshly built ensemble.

    ``double_backward``: the method differentiates through input gradients (the
    method table's fact), which torch.compile cannot; it then runs eagerly and
    ``notify`` receives the one-line notice (default: print to stderr).
    """
    if precision not in PRECISIONS:
        raise UserError(f"[train] precision = {precision!r}: allowed {', '.join(PRECISIONS)}")
    if hasattr(ensemble, "groups"):  # a heterogeneous ensemble: every group
        for group in ensemble.groups:
            configure(group, precision, compile, double_backward=double_backward, name=name,
                      notify=notify)
        return
    ensemble.configured = (precision, compile)
    if precision == "bf16":
        autocast_forward(ensemble.module, ensemble.device.type)
    if not compile:
        return
    if ensemble.execution == "loop":
        raise UserError("[train] compile = true compiles the vmap execution, but this run uses "
                        "'loop' ([ensemble] execution = 'loop' or a generator method): set "
                        "execution = 'vmap' or compile = false")
    if double_backward:
        (notify or _stderr)(f"diverse: [train] compile = true: {name} differentiates through "
                            "input gradients, which torch.compile cannot; running eagerly")
        return
    compile_ensemble(ensemble)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
