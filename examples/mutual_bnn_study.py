"""Mutual BNNs at a budget where the comparison means something: LeNet-5 × 2 peers
on Fashion-MNIST, 10 epochs, with and without the diversity terms.

    python examples/mutual_bnn_study.py --seeds 0 1 2 --out runs/mutual-study
    python examples/mutual_bnn_study.py --out runs/mutual-study --table-only   # what has finished

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

import _study as study

VARIANTS = {name: (f"examples/fmnist_lenet_{name}.toml", [])
            for name in ("mutual_bnn", "mutual_bnn_param", "mutual_bnn_feature", "mutual_bnn_both")}
# a weaker feature term: is β = 2 simply too strong for LeNet-5 at 10 epochs?
VARIANTS["mutual_bnn_both-beta0.5"] = ("examples/fmnist_lenet_mutual_bnn_both.toml",
                                       ["method.beta=0.5"])
# the paper's schedule: 200 epochs of mutual learning, then 100 with the diversity terms
VARIANTS["mutual_bnn_both-start0.67"] = ("examples/fmnist_lenet_mutual_bnn_both.toml",
                                         ["method.diversity_start=0.667"])


def main() -> None:
    study.main(__doc__, VARIANTS, "LeNet-5 × 2 peers, Fashion-MNIST", seeds=[0, 1, 2],
               epochs=10, out="runs/mutual-study")


if __name__ == "__main__":
    main()
