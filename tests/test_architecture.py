"""The package tree shows the architecture, and imports run one way.

Layers, lowest first: the shared base (errors, validation, atomic files, progress) ← pure
math ← networks and data ← methods ← evaluation ← the application edge. A
module may import its own layer and the layers below it, never above (imports
under ``if TYPE_CHECKING:`` are type hints only and do not count).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diverse"
RANK = {"base": 0, "math": 1, "metrics": 1, "nets": 2, "data": 2, "methods": 3, "evaluation": 4,
        "app": 5}
BASE = {"errors", "validate", "checkpoint", "rundir", "progress", "__init__"}


def layer_of(module: str) -> str:
    """``diverse.math.kernels`` → ``math``; a top-level module is the base."""
    parts = module.split(".")
    if len(parts) >= 3 and parts[1] in RANK:
        return parts[1]
    if len(parts) >= 2 and parts[1] in RANK:  # the subpackage itself
        return parts[1]
    return "base"


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def name_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``diverse`` import, outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "diverse":
                found += [(node.lineno, f"diverse.{a.name}") for a in node.names]
            elif node.module.startswith("diverse."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("diverse.")]
    return found


def test_every_module_sits_in_a_layer():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert set(top) <= BASE, f"modules outside the layers: {sorted(set(top) - BASE)}"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") \
        == sorted(k for k in RANK if k != "base")


@pytest.mark.parametrize("path", modules(), ids=lambda p: name_of(p))
def test_imports_run_from_the_application_down_to_the_math(path):
    own = layer_of(name_of(path))
    upward = [f"line {line}: {target} ({layer_of(target)})" for line, target in imported(path)
              if RANK[layer_of(target)] > RANK[own]]
    assert not upward, f"{name_of(path)} ({own}) imports a higher layer: {upward}"


def test_the_base_imports_nothing_above_it():
    for name in BASE - {"__init__"}:
        targets = [t for _line, t in imported(PACKAGE / f"{name}.py")]
        assert all(layer_of(t) == "base" for t in targets), (name, targets)


def test_method_configs_are_abstract_or_final():
    """No config of the method table subclasses another one (shared fields live in an
    abstract base such as ParticleConfig), and each names its own table entry."""
    import diverse

    table = {spec.config for spec in diverse.METHODS.values()}
    for name, spec in diverse.METHODS.items():
        assert not (set(spec.config.__mro__[1:]) & table), spec.config.__name__
        assert isinstance(spec.config(), diverse.MethodConfig)
        if name not in ("f-svgd", "f-wgd"):  # (they share SVGDConfig / WGDConfig by name)
            assert spec.config().name == name
