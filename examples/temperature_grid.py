"""Check a run's fitted temperatures against a dense grid search on its validation NLL.

    python examples/temperature_grid.py runs/fmnist-single --step 1e-4

Rebuilds the run's validation split from its config (``[data]
validation_fraction`` must be > 0), predicts on it with the trained members
(:func:`diverse.load`), and for each temperature-scaling order compares the
stored T (``calibration.json``, fitted by L-BFGS on log T) with the minimizer
of the validation NLL over ``T ∈ [lo, hi]`` on a grid of ``--step``. Prints
both, their difference and the NLL at each.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import diverse
from diverse.data.datasets import denormalize, load_dataset
from diverse.math.calibration import temperature_nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--lo", type=float, default=0.05)
    parser.add_argument("--hi", type=float, default=10.0)
    parser.add_argument("--step", type=float, default=1e-4)
    args = parser.parse_args()
    predictor = diverse.load(args.run_dir)
    if predictor.calibration is None:
        raise SystemExit(f"{args.run_dir} has no calibration.json (no validation split?)")
    data = load_dataset(predictor.cfg.data)
    raw = denormalize(data.x_val, data.mean, data.std)
    prediction = predictor.predict(raw)
    probs, logits = prediction.probs.double(), prediction.logits.double()
    labels = data.y_val
    grid = np.arange(args.lo, args.hi + args.step / 2, args.step)
    print(f"{args.run_dir}: {len(labels)} validation examples, grid {args.lo}..{args.hi} "
          f"step {args.step} ({len(grid)} temperatures)")
    for mode, fitted in predictor.calibration.temperature.items():
        with torch.no_grad():
            nll = np.array([temperature_nll(t, labels, mode, probs=probs, logits=logits)
                            for t in grid])
        best = float(grid[int(np.argmin(nll))])
        at_fit = temperature_nll(fitted, labels, mode, probs=probs, logits=logits)
        at_one = temperature_nll(1.0, labels, mode, probs=probs, logits=logits)
        print(f"  {mode:>7}: L-BFGS T = {fitted:.6f} (NLL {at_fit:.6f}), grid T = {best:.6f} "
              f"(NLL {nll.min():.6f}), |difference| = {abs(fitted - best):.2e}; "
              f"NLL at T = 1: {at_one:.6f}")

if __name__ == "__main__":
    main()
