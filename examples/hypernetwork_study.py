"""What holds the hypernetwork back: LeNet-5 × 5 on Fashion-MNIST at the deep ensemble's budget.

    python examples/hypernetwork_study.py --out runs/hyper-study       # every variant, seed 0
    python examples/hypernetwork_study.py --variants hyper de de-lr0.0065 --seeds 0 1 2  # final

Each variant is ``diverse train`` of ``examples/fmnist_lenet_de.toml`` or
``examples/fmnist_lenet_hyper.toml`` with the overrides below, all at the same
budget (``--epochs``, default 1: the same epochs over the same data). A run
that already has ``metrics.json`` is not run again, so the study can be
stopped and resumed. The table gives, per variant, the mean ± sd over the
seeds of: ensemble accuracy, mean member accuracy, NLL, ECE, disagreement,
mean pairwise linear CKA between members at the last two feature layers
(``classifier.act3``, ``classifier.act4``; ``examples/_study.py``),
OOD AUROC (predictive entropy) against digits and synthetic outliers, and the
training time. Results and what they mean are in the README ("A hypernetwork
at the ensemble's budget").
"""

from __future__ import annotations

import _study as study

DE, HYPER = "examples/fmnist_lenet_de.toml", "examples/fmnist_lenet_hyper.toml"
BASE = ["method.gamma=0.25", "method.code_lr=1.0", "train.lr=0.002"]  # hyper's old defaults

# name → (config, overrides); "hyper" is the shipped example as it is
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "de": (DE, []),
    "de-lr0.004": (DE, ["train.lr=0.004"]),
    "de-lr0.0065": (DE, ["train.lr=0.0065"]),
    "de-lr0.01": (DE, ["train.lr=0.01"]),
    "hyper": (HYPER, []),
    "hyper-old-defaults": (HYPER, BASE),
    "gamma0": (HYPER, [*BASE, "method.gamma=0"]),
    "gamma0.02": (HYPER, [*BASE, "method.gamma=0.02"]),
    "gamma0.05": (HYPER, [*BASE, "method.gamma=0.05"]),
    "gamma0.1": (HYPER, [*BASE, "method.gamma=0.1"]),
    "lr0.004": (HYPER, [*BASE, "train.lr=0.004"]),
    "lr0.004-gamma0": (HYPER, [*BASE, "train.lr=0.004", "method.gamma=0"]),
    "lr0.004-gamma0.02": (HYPER, [*BASE, "train.lr=0.004", "method.gamma=0.02"]),
    "lr0.004-gamma0.05": (HYPER, [*BASE, "train.lr=0.004", "method.gamma=0.05"]),
    "lr0.004-gamma0.1": (HYPER, [*BASE, "train.lr=0.004", "method.gamma=0.1"]),
    "spread0.3-gamma0": (HYPER, [*BASE, "method.spread=0.3", "method.gamma=0"]),
    "code_dim128": (HYPER, [*BASE, "method.code_dim=128"]),
    "members10": (HYPER, [*BASE, "ensemble.members=10"]),
    "lr0.004-gamma0.1-code_lr4": (HYPER, [*BASE, "train.lr=0.004", "method.gamma=0.1",
                                          "method.code_lr=4"]),
    "lr0.004-gamma0.1-code_lr0.25": (HYPER, [*BASE, "train.lr=0.004", "method.gamma=0.1",
                                             "method.code_lr=0.25"]),
    "lr0.0065-gamma0": (HYPER, [*BASE, "train.lr=0.0065", "method.gamma=0"]),
    "lr0.0065-gamma0.02": (HYPER, [*BASE, "train.lr=0.0065", "method.gamma=0.02"]),
    "lr0.0065-gamma0.1": (HYPER, [*BASE, "train.lr=0.0065", "method.gamma=0.1"]),
    "lr0.0065-gamma0.02-code_lr0.25": (HYPER, [*BASE, "train.lr=0.0065", "method.gamma=0.02",
                                               "method.code_lr=0.25"]),
    "lr0.0065-gamma0.02-code_lr0.1": (HYPER, [*BASE, "train.lr=0.0065", "method.gamma=0.02",
                                              "method.code_lr=0.1"]),
    "lr0.0065-gamma0.05-code_lr0.25": (HYPER, [*BASE, "train.lr=0.0065", "method.gamma=0.05",
                                               "method.code_lr=0.25"]),
    "lr0.0065-gamma0.1-code_lr0.25": (HYPER, [*BASE, "train.lr=0.0065", "method.gamma=0.1",
                                              "method.code_lr=0.25"]),
    "lr0.01-gamma0.02": (HYPER, [*BASE, "train.lr=0.01", "method.gamma=0.02"]),
    "lr0.01-gamma0.02-code_lr0.25": (HYPER, [*BASE, "train.lr=0.01", "method.gamma=0.02",
                                             "method.code_lr=0.25"]),
    "lr0.0065-gamma0.02-weight_norm": (HYPER, [*BASE, "train.lr=0.0065", "method.gamma=0.02",
                                               "method.weight_norm=true"]),
    "lr0.0065-gamma0.1-weight_norm": (HYPER, [*BASE, "train.lr=0.0065", "method.gamma=0.1",
                                              "method.weight_norm=true"]),
    "lr0.0065-gamma0.02-spread0.3": (HYPER, [*BASE, "train.lr=0.0065", "method.gamma=0.02",
                                             "method.spread=0.3"]),
}


def main() -> None:
    study.main(__doc__, VARIANTS, "LeNet-5 × 5, Fashion-MNIST", seeds=[0], epochs=1,
               out="runs/hyper-study")


if __name__ == "__main__":
    main()
