"""Step time of each training method relative to the deep ensemble.

One step = the method's update on a batch of 128 (forward, its interaction
terms, backward; FoRDE's double backward through the input gradients) plus one
Adam step on the stacked parameters. For each model the methods run in one
process, interleaved, ``--repeats`` rounds of ``--steps`` steps; the table
gives the median ms/step and the ratio to DE measured in the same run. The
second table shows how the interaction cost grows with M for an MLP.

    .venv/bin/python benchmarks/method_step.py
    .venv/bin/python benchmarks/method_step.py --models resnet20 --device cuda

Results are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from diverse.app.config import config_from_dict
from diverse.data.datasets import Dataset
from diverse.methods.base import Step, TrainingData, set_grads
from diverse.methods.catalog import Method
from diverse.nets.likelihoods import Categorical
from diverse.nets.models import build_model

MODELS = {"mlp": ({"name": "mlp", "hidden": [200, 200]}, (1, 28, 28)),
          # the RDE reference code's Fashion-MNIST MLP (REFERENCES §6: 15.3 / 19.3 / 21.9 ms
          # per step for DE / WGD-kde / f-WGD-kde with 10 particles on this CPU)
          "mlp100": ({"name": "mlp", "hidden": [100, 100]}, (1, 28, 28)),
          "lenet5": ({"name": "lenet5"}, (1, 28, 28)),
          "resnet20": ({"name": "resnet20", "norm": "group"}, (3, 32, 32))}
METHOD_TABLES = {
    "de": {"name": "de"},
    "svgd": {"name": "svgd"},
    "wgd-kde": {"name": "wgd", "estimator": "kde"},
    "wgd-sge": {"name": "wgd", "estimator": "sge"},
    "wgd-ssge": {"name": "wgd", "estimator": "ssge"},
    "f-wgd-kde": {"name": "f-wgd", "estimator": "kde"},
    "f-wgd-ssge": {"name": "f-wgd", "estimator": "ssge"},
    "f-svgd": {"name": "f-svgd", "output": "logits"},
    # without the function-space prior: no weight-prior draws, no prior forward
    "f-wgd-kde-noprior": {"name": "f-wgd", "estimator": "kde"},
    "forde-pca": {"name": "forde", "lengthscales": "pca"},
    "forde-identity": {"name": "forde", "lengthscales": "identity"},
    "he-cka": {"name": "he-cka"},
    "he-cka-outliers": {"name": "he-cka", "outliers": 64},
    "svgd-cka": {"name": "svgd-cka"},
    "hyper-he-cka": {"name": "hyper-he-cka"},
    "mutual-bnn": {"name": "mutual-bnn"},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_stepper(model: str, method: str, members: int, device: torch.device, batch: int,
                 execution: str):
    model_table, shape = MODELS[model]
    prior_std = 0.0 if method.endswith("-noprior") else 1.0
    cfg = config_from_dict({"model": model_table, "method": METHOD_TABLES[method],
                            "ensemble": {"members": members, "execution": execution}})
    x_train = torch.randn(512, *shape)
    data = Dataset("bench", "classification", x_train, torch.zeros(512, dtype=torch.long),
                   x_train, torch.zeros(512, dtype=torch.long), 10, {}, (0.0,), (1.0,))
    method = Method(cfg.method, TrainingData.of(data))
    # a hypernetwork is one slot generating M members per step (Method.ensemble)
    ens = method.ensemble(lambda: build_model(cfg.model, shape, 10), members, seed=0,
                          execution=execution, device=device).train()
    update = method.update
    opt = torch.optim.Adam(list(ens.params.values()), lr=1e-3)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    lik = Categorical()

    count = iter(range(10**6, 10**9))  # step numbers past every warm-up, as in training

    def step() -> None:
        result = update(Step(ens, x, y, lik, n_train=60000, prior_std=prior_std, progress=0.5,
                             index=next(count)))
        if result.grads is not None:  # a sampler moves θ itself
            set_grads(ens.params, result.grads)  # as the training loop does
            opt.step()

    return step


def timed(steppers: dict, device: torch.device, steps: int, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for run in steppers.values():
        run()
        run()
    for _ in range(repeats):
        for name, run in steppers.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5"], choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHOD_TABLES),
                        choices=list(METHOD_TABLES))
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--scaling", nargs="*", type=int, default=[10, 20, 50, 100],
                        help="M values for the MLP scaling table (empty: skip)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--execution", default="", help="vmap | loop (default: per model, "
                        "the faster on this machine: loop for conv nets on CPU, else vmap)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"# {time.strftime('%Y-%m-%d')} · python {platform.python_version()} · torch "
          f"{torch.__version__} · threads {torch.get_num_threads()} · {platform.platform()}"
          + (f" · {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    for model in args.models:
        execution = args.execution or ("loop" if not model.startswith("mlp")
                                       and device.type == "cpu" else "vmap")
        steppers = {m: make_stepper(model, m, args.members, device, 128, execution)
                    for m in args.methods}
        med = timed(steppers, device, args.steps, args.repeats)
        print(f"\n{model}, M = {args.members}, batch 128, {execution}\n")
        print("| method | ms/step | × DE |\n|---|---|---|")
        for m, ms in med.items():
            print(f"| {m} | {ms:.1f} | {ms / med['de']:.2f} |", flush=True)
    if args.scaling:
        print("\nInteraction cost against M (MLP 784-200-200-10, vmap)\n")
        print("| M | " + " | ".join(f"{m} ms (× DE)" for m in args.methods) + " |")
        print("|---|" + "---|" * len(args.methods))
        for members in args.scaling:
            steppers = {m: make_stepper("mlp", m, members, device, 128, "vmap")
                        for m in args.methods}
            med = timed(steppers, device, max(2, args.steps // 2), args.repeats)
            print(f"| {members} | " + " | ".join(
                f"{med[m]:.0f} ({med[m] / med['de']:.2f})" for m in args.methods) + " |",
                flush=True)


if __name__ == "__main__":
    main()
