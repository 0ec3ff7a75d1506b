"""Every method's one-step update on fixed parameters, batch and seed, in float64.

``tests/methods/test_update_reference.py`` compares today's updates with the ones
stored in ``tests/methods/data/update_reference.safetensors`` (+ ``.json`` for the
scalar diagnostics), written by this script at the commit named in the JSON. A
faster formulation of a method (issue 14: interactions on the stacked leaves,
FoRDE's repulsion pulled back without the embedding in the graph, device-side
diagnostics) must reproduce them to float64 round-off.

    .venv/bin/python tests/methods/update_reference.py --write   # only to re-baseline
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diverse.app.config import config_from_dict
from diverse.data.datasets import Dataset
from diverse.methods.base import Step, TrainingData
from diverse.methods.catalog import Method
from diverse.nets.likelihoods import Categorical
from diverse.nets.models import build_model

STORE = Path(__file__).parent / "data" / "update_reference"
#: input shape per model: the MLPs see 8 × 8 images (PCA lengthscales 64 × 64), LeNet-5 its
#: smallest input, 16 × 16
SHAPES = {"mlp": (1, 8, 8), "lenet5": (1, 16, 16)}
MLP = {"name": "mlp", "hidden": [12, 10], "activation": "tanh"}
RELU_MLP = {"name": "mlp", "hidden": [12, 10]}
CNN = {"name": "lenet5"}

#: case name → (model table, method table, members)
CASES: dict[str, tuple[dict, dict, int]] = {
    "de": (MLP, {"name": "de"}, 4),
    "svgd-rbf": (MLP, {"name": "svgd"}, 5),
    "svgd-laplace": (MLP, {"name": "svgd", "kernel": "laplace", "bandwidth": "median-rde"}, 4),
    "svgd-imq-batch": (MLP, {"name": "svgd", "kernel": "imq", "repulsion_scale": "batch",
                             "annealing": "linear"}, 4),
    "svgd-fgsm": (MLP, {"name": "svgd", "fgsm_epsilon": 0.05, "repulsion_scale": "batch"}, 3),
    "svgd-cnn": (CNN, {"name": "svgd", "repulsion_scale": "batch"}, 3),
    "wgd-kde": (MLP, {"name": "wgd", "estimator": "kde", "repulsion_scale": "batch"}, 5),
    "wgd-kde-laplace": (MLP, {"name": "wgd", "estimator": "kde", "kernel": "laplace",
                              "bandwidth": "fixed", "bandwidth_value": 3.0}, 4),
    "wgd-sge": (MLP, {"name": "wgd", "estimator": "sge", "repulsion_scale": "batch"}, 5),
    "wgd-ssge": (MLP, {"name": "wgd", "estimator": "ssge", "bandwidth": "median-stein"}, 5),
    "wgd-ssge-eigen": (MLP, {"name": "wgd", "estimator": "ssge", "num_eigen": 3,
                             "repulsion_scale": "batch"}, 5),
    "wgd-kde-cnn": (CNN, {"name": "wgd", "estimator": "kde"}, 3),
    "f-wgd-kde": (MLP, {"name": "f-wgd", "estimator": "kde"}, 4),
    "f-wgd-ssge-context": (MLP, {"name": "f-wgd", "estimator": "ssge", "context_points": 5,
                                 "prior_samples": 6}, 4),
    "f-svgd": (MLP, {"name": "f-svgd", "output": "logits", "repulsion_scale": "batch"}, 4),
    # diagnostics_every = 1: the stored steps measured both terms' norms (step index 25)
    "forde-pca": (MLP, {"name": "forde", "diagnostics_every": 1}, 4),
    "forde-pca-relu": (RELU_MLP, {"name": "forde", "alpha": 0.5, "pca": "covariance",
                                  "diagnostics_every": 1}, 3),
    "forde-identity-n": (MLP, {"name": "forde", "lengthscales": "identity",
                               "repulsion_scale": "n", "annealing": "cyclic",
                               "diagnostics_every": 1}, 4),
    "forde-cnn": (CNN, {"name": "forde", "diagnostics_every": 1}, 3),
    "he-cka": (MLP, {"name": "he-cka", "warmup_steps": 0}, 3),
    "he-cka-outliers": (MLP, {"name": "he-cka", "warmup_steps": 0, "outliers": 4,
                              "outlier_pool": 16}, 3),
    "svgd-cka": (MLP, {"name": "svgd-cka"}, 3),
    "hyper-he-cka": (MLP, {"name": "hyper-he-cka", "z_dim": 4, "hidden": 8}, 3),
    "mc-dropout": ({**MLP, "dropout": 0.2}, {"name": "mc-dropout"}, 3),
    "laplace": (MLP, {"name": "laplace"}, 2),
    "hmc": (MLP, {"name": "hmc", "leapfrog_steps": 3}, 2),
    "mutual-bnn": (MLP, {"name": "mutual-bnn"}, 2),
    "vi": (MLP, {"name": "vi"}, 3),
    "swag": (MLP, {"name": "swag", "swa_start": 0.0, "swa_frequency": 1}, 3),
    "sghmc": (MLP, {"name": "sghmc"}, 3),
}


def compute(case: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``(tensors, logs)`` of one step of ``case`` on its fixed data (float64)."""
    model, method_table, members = CASES[case]
    cfg = config_from_dict({"model": model, "method": method_table,
                            "ensemble": {"members": members, "execution": "vmap"},
                            "train": {"prior_std": 1.0}})
    shape = SHAPES[model["name"]]
    gen = torch.Generator().manual_seed(7)
    x_train = torch.randn(64, *shape, generator=gen, dtype=torch.float64) * 0.8 + 0.3
    y_train = torch.randint(0, 5, (64,), generator=gen)
    data = Dataset("reference", "classification", x_train, y_train, x_train, y_train, 5, {},
                   (0.0,), (1.0,))
    torch.manual_seed(0)
    method = Method(cfg.method, TrainingData.of(data))
    ens = method.ensemble(lambda: build_model(cfg.model, shape, 5), members, seed=3,
                          execution="vmap").to(torch.float64).train()
    x, y = x_train[:16], y_train[:16]
    torch.manual_seed(11)
    result = method.update(Step(ens, x, y, Categorical(), n_train=640, prior_std=1.0,
                                progress=0.4, index=25, state=method.init_state(ens)))
    tensors = {"loss": result.loss, "outputs": result.outputs}
    if result.grads is not None:
        tensors.update({f"grad.{k}": g for k, g in result.grads.items()})
    else:  # a sampler moved θ itself
        tensors.update({f"param.{k}": v.detach() for k, v in ens.params.items()})
    logs = {k: float(v) for k, v in result.logs.items()}
    return {f"{case}/{k}": v.detach().contiguous() for k, v in tensors.items()}, logs


def compute_all() -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    tensors, logs = {}, {}
    for case in CASES:
        t, lg = compute(case)
        tensors.update(t)
        logs[case] = lg
    return tensors, logs


def load() -> tuple[dict[str, torch.Tensor], dict]:
    meta = json.loads(STORE.with_suffix(".json").read_text())
    return load_file(str(STORE.with_suffix(".safetensors"))), meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="store today's updates")
    args = parser.parse_args()
    tensors, logs = compute_all()
    if not args.write:
        print(f"{len(tensors)} tensors, {len(logs)} cases (pass --write to store them)")
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    STORE.parent.mkdir(exist_ok=True)
    save_file(tensors, str(STORE.with_suffix(".safetensors")))
    STORE.with_suffix(".json").write_text(json.dumps({"commit": commit, "logs": logs},
                                                     indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(tensors)} tensors of {len(logs)} cases at {commit}")


if __name__ == "__main__":
    main()
