"""What the example studies share: train one configuration at one seed through
the CLI, read a run's figures, and print mean ± sd tables.

Used by ``examples/hypernetwork_study.py`` and ``examples/mutual_bnn_study.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

LAYERS = ("classifier.act3", "classifier.act4")  # LeNet-5's last two feature layers


def train(config: str, overrides: Sequence[str], folder: Path, epochs: int, seed: int) -> Path:
    """``diverse train config --set …`` into ``folder``; skipped when ``metrics.json`` exists.

    The wall-clock seconds of the run go to ``folder/study_seconds.txt``.
    """
    if (folder / "metrics.json").exists():
        return folder
    sets = [*overrides, f"train.epochs={epochs}", f"train.seed={seed}"]
    command = [sys.executable, "-m", "diverse.app.cli", "train", config, "--out", str(folder),
               "--quiet"] + [arg for s in sets for arg in ("--set", s)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    (folder / "study_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return folder


def figures(folder: Path) -> dict[str, float]:
    """The tables' figures of one classification run folder: ensemble and mean member
    accuracy, NLL, ECE, disagreement, mean pairwise linear CKA between members at
    :data:`LAYERS` (:func:`diverse.evaluation.evaluate.member_cka`), OOD AUROC by
    predictive entropy against digits and synthetic outliers, and training seconds."""
    m = json.loads((folder / "metrics.json").read_text())
    layers = m.get("cka", {}).get("layers", {})
    seconds = folder / "study_seconds.txt"
    return {
        "accuracy": m["accuracy"], "member accuracy": float(np.mean(m["member_accuracy"])),
        "nll": m["nll"], "ece": m["ece"], "disagreement": m["disagreement"],
        **{f"CKA {layer.split('.')[-1]}": layers.get(layer, {}).get("mean", float("nan"))
           for layer in LAYERS},
        "auroc digits": m["ood"]["digits"]["auroc"],
        "auroc synthetic": m["ood"]["synthetic"]["auroc"],
        "seconds": float(seconds.read_text()) if seconds.exists() else float("nan"),
    }


def table(rows: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table: one row per variant, mean ± sd (ddof 1) over its runs."""
    keys = list(next(iter(rows.values()))[0])
    lines = ["| variant | n | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, runs in rows.items():
        cells = []
        for key in keys:
            values = np.array([r[key] for r in runs], dtype=float)
            digits = 0 if key == "seconds" else 4
            cell = f"{values.mean():.{digits}f}"
            if len(values) > 1:
                cell += f" ± {values.std(ddof=1):.{digits}f}"
            cells.append(cell)
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(doc: str, variants: Mapping[str, tuple[str, Sequence[str]]], title: str, *,
         seeds: Sequence[int], epochs: int, out: str) -> None:
    """A study's command line: train ``--variants`` (name → (config, overrides)) at
    ``--seeds`` for ``--epochs`` into ``--out/<name>-s<seed>`` and print the table."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(variants), choices=list(variants))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(seeds))
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: tabulate the runs that have finished")
    args = parser.parse_args()
    if not args.table_only:
        os.makedirs(args.out, exist_ok=True)
    rows = {}
    for name in args.variants:
        config, overrides = variants[name]
        folders = [args.out / f"{name}-s{seed}" for seed in args.seeds]
        if args.table_only:
            folders = [f for f in folders if (f / "metrics.json").exists()]
        else:
            folders = [train(config, overrides, f, args.epochs, seed)
                       for f, seed in zip(folders, args.seeds, strict=True)]
        if folders:
            rows[name] = [figures(f) for f in folders]
        print(f"{name}: done", file=sys.stderr)
    if not rows:
        raise SystemExit(f"no finished runs under {args.out}")
    print(f"{title}, {args.epochs} epoch(s), seeds {args.seeds}")
    print(table(rows))
