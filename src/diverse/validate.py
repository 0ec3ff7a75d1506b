"""One-line checks of config values: each raises UserError naming the key and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from diverse.errors import UserError


def check_count(where: str, value: Any, least: int = 1) -> None:
    """UserError unless ``value`` is an integer ≥ ``least`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{where} = {value!r}: must be an integer >= {least}")


def check_number(where: str, value: Any, ok: Callable[[float], bool], allowed: str) -> None:
    """UserError unless ``value`` is a finite real number (not a bool) with ``ok(value)``."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not ok(value):
        raise UserError(f"{where} = {value!r}: must be {allowed}")


def check_choice(where: str, value: Any, allowed: Sequence[str]) -> None:
    """UserError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise UserError(f"{where} = {value!r}: allowed {', '.join(allowed)}")
