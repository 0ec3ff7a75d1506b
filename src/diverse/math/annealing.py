"""Annealing of the driving term a_t of particle updates.

The repulsive-ensemble reference code multiplies the driving (log-posterior)
term, never the repulsion, by a schedule a_t; the paper does not mention it
but its published runs depend on it (D'Angelo & Fortuin 2021,
ratschlab/repulsive_ensembles). ``t`` is the training
progress in ``[0, 1]``.
"""

from __future__ import annotations

import math

from diverse.errors import UserError

ANNEALINGS = ("constant", "linear", "hyper", "cyclic")


def anneal(name: str, t: float, *, cycles: int = 4, power: float = 10.0) -> float:
    """Driving-term factor a_t ∈ [0, 1].

    * ``constant``: 1.
    * ``linear``: t (0 → 1 over training).
    * ``hyper``: tanh((1.3 t)^p), p = 10 — ≈ 0 for the first ~half, then 1.
    * ``cyclic``: within each of ``cycles`` equal cycles, a cosine ramp
      ½(1 − cos(π u)) from 0 to 1 (u = position in the cycle).
    """
    t = min(max(t, 0.0), 1.0)
    if name == "constant":
        return 1.0
    if name == "linear":
        return t
    if name == "hyper":
        return math.tanh((1.3 * t) ** power)
    if name == "cyclic":
        u = (t * cycles) % 1.0
        return 0.5 * (1.0 - math.cos(math.pi * u))
    raise UserError(f"[method] annealing = {name!r}: allowed {', '.join(ANNEALINGS)}")
