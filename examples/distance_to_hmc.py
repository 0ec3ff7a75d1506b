"""Distance of every method's predictive to an HMC reference on the 1D regression toy.

    diverse train examples/regression_1d_hmc.toml --out runs/toy-hmc
    diverse train examples/regression_1d_de.toml --out runs/toy-de      # ... and the others
    python examples/distance_to_hmc.py runs/toy-hmc runs/toy-de runs/toy-svgd ... --out table.md

For each run (all on the toy's 200 test inputs, x ∈ [0, 7]): the mean over x of
the exact W2 between its samples of f(x) and HMC's, the ratio of its std of f to
HMC's and the mean |μ − μ_HMC| in the gap between the training intervals, in
extrapolation and near the data (:mod:`diverse.evaluation.reference`), and the NLL of
noisy held-out targets y = x·sin x + ε, ε ~ N(0, σ²) (σ the reference run's
likelihood noise; ``--noise-draws`` targets per x, seeded) under each
predictive (the mixture of the members' Gaussians). A "floor" row compares
``--floor-draws`` HMC draws with the rest of the HMC draws: the W2 an exact
sampler reaches with that few samples.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import numpy as np
import torch

from diverse.checkpoint import atomic_write_text
from diverse.data.toys import regression_1d_function
from diverse.evaluation.reference import REGIONS, distance_table, input_regions


def _load(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "predictions.npz", allow_pickle=False) as npz:
        if "means" not in npz.files:
            raise SystemExit(f"{run_dir}: not a regression run (no means in predictions.npz)")
        return {k: npz[k] for k in npz.files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="the HMC run directory")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--noise-draws", type=int, default=20)
    parser.add_argument("--floor-draws", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the table (Markdown) here")
    args = parser.parse_args()
    ref_dir = Path(args.reference)
    ref = _load(ref_dir)
    config = tomllib.loads((ref_dir / "config.toml").read_text())
    if config["data"]["name"] != "regression-1d":
        raise SystemExit("the noisy held-out targets are those of the regression-1d toy")
    sigma = float(config["likelihood"]["noise_std"])
    x = torch.from_numpy(ref["inputs"][:, 0]).double()
    regions = input_regions(x, torch.from_numpy(ref["train_inputs"][:, 0]))
    g = torch.Generator().manual_seed(args.seed)
    targets = regression_1d_function(x)[None] + sigma * torch.randn(
        args.noise_draws, len(x), generator=g, dtype=torch.float64)
    f_ref = torch.from_numpy(ref["means"][..., 0]).double()
    noise_ref = torch.from_numpy(ref["stds"][..., 0]).double()
    rows = {}
    order = torch.randperm(len(f_ref), generator=g)
    few, rest = order[:args.floor_draws], order[args.floor_draws:]
    rows[f"floor: {args.floor_draws} HMC draws"] = distance_table(
        f_ref[few], f_ref[rest], regions, noise_ref[few], noise_ref[rest], targets)
    for run in args.runs:
        arrays = _load(Path(run))
        if not np.allclose(arrays["inputs"], ref["inputs"]):
            raise SystemExit(f"{run}: test inputs differ from the reference's")
        rows[Path(run).name] = distance_table(
            torch.from_numpy(arrays["means"][..., 0]).double(), f_ref, regions,
            torch.from_numpy(arrays["stds"][..., 0]).double(), noise_ref, targets)
    hmc_nll = next(iter(rows.values()))["heldout_nll_ref"]
    columns = (["w2"] + [f"w2_{r}" for r in REGIONS] + [f"std_ratio_{r}" for r in REGIONS]
               + [f"mean_diff_{r}" for r in REGIONS] + ["heldout_nll"])
    lines = [f"Reference: {ref_dir.name} ({len(f_ref)} draws); held-out NLL of HMC itself "
             f"{hmc_nll:.4f} ({args.noise_draws} noisy targets per x, σ = {sigma}); regions: "
             + ", ".join(f"{r} {int(m.sum())} inputs" for r, m in regions.items()), "",
             "| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{row[c]:.4f}" if c in row else "–" for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text)


if __name__ == "__main__":
    main()
