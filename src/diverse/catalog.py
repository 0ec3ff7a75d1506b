"""The one name → (config dataclass, builder) table of training methods.

Read at the configuration edge (``[method] name``); every method is a
builder ``(config, dataset) -> update``, see :mod:`diverse.methods`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diverse.forde import FoRDEConfig, build_forde
from diverse.methods import DeepEnsembleConfig, Step, StepResult, deep_ensemble
from diverse.particles import (
    SVGDConfig,
    WGDConfig,
    build_f_svgd,
    build_f_wgd,
    build_svgd,
    build_wgd,
)

MethodBuilder = Callable[[Any, Any], Callable[[Step], StepResult]]

METHODS: dict[str, tuple[type, MethodBuilder]] = {
    "de": (DeepEnsembleConfig, deep_ensemble),
    "svgd": (SVGDConfig, build_svgd),
    "wgd": (WGDConfig, build_wgd),
    "f-svgd": (SVGDConfig, build_f_svgd),
    "f-wgd": (WGDConfig, build_f_wgd),
    "forde": (FoRDEConfig, build_forde),
}
