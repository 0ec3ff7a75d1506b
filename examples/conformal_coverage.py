"""Empirical coverage of split conformal prediction over random calibration/test splits.

Reads a finished run's ``predictions.npz`` (test-set predictions) and, for each of
``--splits`` seeded random halvings of the test set, calibrates on one half and
measures coverage and set size (interval width) on the other:

    python examples/conformal_coverage.py runs/fashion-mnist-de --alpha 0.1 --splits 20

Classification: LAC, APS and RAPS sets (:mod:`diverse.metrics.conformal`); regression:
``μ ± q̂ σ`` intervals from normalized residuals. Prints mean ± std, min and max
of the coverage over splits and the mean set size, and writes
``RUN/conformal_coverage.json``. Measured figures are in the README
("Post-hoc calibration and conformal prediction").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from diverse import metrics
from diverse.checkpoint import atomic_write_json
from diverse.metrics import conformal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--calibration-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    with np.load(run_dir / "predictions.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if "probs" in arrays:
        probs = torch.from_numpy(arrays["probs"]).double()
        labels = torch.from_numpy(arrays["labels"])
        result = conformal.split_coverage(metrics.mean_probs(probs), labels, args.alpha,
                                          args.splits, args.calibration_fraction, args.seed)
        size_key = "mean_size"
    else:
        means = torch.from_numpy(arrays["means"]).double()
        stds = torch.from_numpy(arrays["stds"]).double()
        mean, std = means.mean(0), metrics.predictive_std(means, stds)
        result = {"interval": conformal.split_interval_coverage(
            mean, std, torch.from_numpy(arrays["targets"]), args.alpha, args.splits,
            args.calibration_fraction, args.seed)}
        size_key = "mean_width"
    n = len(arrays.get("labels", arrays.get("targets")))
    print(f"{run_dir}: {args.splits} splits of {n} test examples "
          f"({args.calibration_fraction:.0%} calibrate), alpha = {args.alpha}, target coverage "
          f"{1 - args.alpha:.3f}")
    summary = {}
    for name, figures in result.items():
        cov = np.array(figures["coverage"])
        size = np.array(figures[size_key])
        summary[name] = {"coverage_mean": float(cov.mean()), "coverage_std": float(cov.std(ddof=1)),
                         "coverage_min": float(cov.min()), "coverage_max": float(cov.max()),
                         size_key: float(size.mean()), **figures}
        worst = figures.get("worst_class_coverage")
        extra = f", worst class {np.mean(worst):.4f}" if worst else ""
        print(f"  {name:>8}: coverage {cov.mean():.4f} ± {cov.std(ddof=1):.4f} "
              f"(min {cov.min():.4f}, max {cov.max():.4f}){extra}, "
              f"{size_key.replace('_', ' ')} {size.mean():.3f}")
    atomic_write_json(run_dir / "conformal_coverage.json",
                      {"alpha": args.alpha, "splits": args.splits, "seed": args.seed,
                       "calibration_fraction": args.calibration_fraction, "results": summary})


if __name__ == "__main__":
    main()
