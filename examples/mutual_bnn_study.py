"""Mutual BNNs at a budget where the comparison means something: LeNet-5 × 2 peers
on Fashion-MNIST, 10 epochs, with and without the diversity terms.

    python examples/mutual_bnn_study.py --seeds 0 1 2 --out runs/mutual-study

Each variant is ``diverse train examples/fmnist_lenet_<variant>.toml --set
train.epochs=10 --set train.seed=S`` into ``<out>/<variant>-s<S>``: plain mutual
learning (``mutual_bnn``: ELBO + the peers' tempered KL, α = β = 0), the
parameter diversity term alone (``mutual_bnn_param``, α = 1), the feature
diversity term alone (``mutual_bnn_feature``, β = 2) and both
(``mutual_bnn_both``), as in seed 001. A run that already has ``metrics.json`` is
not run again, so the study can be stopped, resumed or spread over processes
(``--variants``). The table gives the mean ± sd over the seeds of the figures of
``examples/_study.py``; results are in the README ("Mutual BNNs at ten epochs").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from _study import figures, table, train

VARIANTS = ("mutual_bnn", "mutual_bnn_param", "mutual_bnn_feature", "mutual_bnn_both")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/mutual-study"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = {}
    for name in args.variants:
        rows[name] = [figures(train(f"examples/fmnist_lenet_{name}.toml", [],
                                    args.out / f"{name}-s{seed}", args.epochs, seed))
                      for seed in args.seeds]
        print(f"{name}: done", file=sys.stderr)
    print(f"LeNet-5 × 2 peers, Fashion-MNIST, {args.epochs} epochs, seeds {args.seeds}")
    print(table(rows))


if __name__ == "__main__":
    main()
