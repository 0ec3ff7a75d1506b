"""Training throughput on one device: execution × precision × compilation, and methods / DE.

One step = the method's update on a batch of B shared by the M members plus
one Adam step on the stacked parameters; throughput is M·B/step images per
second (every member sees the batch). Two tables:

1. the deep ensemble for each variant — ``loop``, ``vmap``, ``vmap+compile``,
   ``vmap+bf16``, ``vmap+compile+bf16`` ([train] precision / compile, see
   :mod:`diverse.nets.precision`): ms/step, images/s and, on CUDA, the step's
   extra memory (peak allocated during the step minus allocated before it);
2. each method's ms/step and ratio over DE under one variant
   (``--method-variant``; FoRDE runs eagerly when it asks for compilation).

Variants and methods are interleaved, ``--repeats`` rounds of ``--steps`` steps,
after ``--warmup`` steps (compilation happens there); medians are reported.

    .venv/bin/python benchmarks/throughput.py --device cuda        # ResNet-20, M = 10, B = 128
    .venv/bin/python benchmarks/throughput.py --model mlp --members 4 --steps 2 --repeats 2 \\
        --variants loop vmap vmap+bf16 --method-variant vmap          # CPU smoke run

Issue 7's targets (H100): DE vmap 29 ms/step fp32, 11 ms/step compiled bf16
(≈ 116k images/s); aim ≥ 150k images/s and FoRDE ≤ 2× DE. Results go to
benchmarks/README.md with device, versions and date.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch

from diverse.app.config import config_from_dict
from diverse.data.datasets import Dataset
from diverse.methods.base import Step, TrainingData, set_grads
from diverse.methods.catalog import Method
from diverse.nets import precision
from diverse.nets.ensemble import Ensemble
from diverse.nets.likelihoods import Categorical
from diverse.nets.models import build_model

MODELS = {"resnet20": ({"name": "resnet20", "norm": "group"}, (3, 32, 32)),
          "resnet20-bn": ({"name": "resnet20", "norm": "batch"}, (3, 32, 32)),
          "mlp": ({"name": "mlp", "hidden": [200, 200]}, (1, 28, 28))}
VARIANTS = {  # name: (execution, precision, compile)
    "loop": ("loop", "fp32", False),
    "vmap": ("vmap", "fp32", False),
    "vmap+compile": ("vmap", "fp32", True),
    "vmap+bf16": ("vmap", "bf16", False),
    "vmap+compile+bf16": ("vmap", "bf16", True),
}
METHOD_TABLES = {
    "de": {"name": "de"},
    "svgd": {"name": "svgd"},
    "wgd-kde": {"name": "wgd", "estimator": "kde"},
    "f-wgd-kde": {"name": "f-wgd", "estimator": "kde"},
    "forde-pca": {"name": "forde", "lengthscales": "pca"},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: str, method: str, variant: str, members: int, batch: int,
              device: torch.device) -> Callable[[], None]:
    table, shape = MODELS[model]
    execution, prec, compiled = VARIANTS[variant]
    cfg = config_from_dict({"model": table, "method": METHOD_TABLES[method],
                            "ensemble": {"members": members, "execution": execution},
                            "train": {"prior_std": 1.0}})
    x_train = torch.randn(512, *shape)
    labels = torch.randint(0, 10, (512,))
    data = Dataset("bench", "classification", x_train, labels, x_train, labels, 10, {},
                   (0.0,), (1.0,))
    ens = Ensemble(lambda: build_model(cfg.model, shape, 10), members, seed=0,
                   execution=execution, device=device).train()
    method = Method(cfg.method, TrainingData.of(data))
    precision.configure(ens, prec, compiled, double_backward=method.spec.double_backward,
                        name=method.name)
    update = method.update
    opt = torch.optim.Adam(list(ens.params.values()), lr=1e-3)
    x, y = x_train[:batch].to(device), labels[:batch].to(device)

    count = iter(range(10**6, 10**9))  # step numbers past every warm-up, as in training

    def step() -> None:
        result = update(Step(ens, x, y, Categorical(), 50_000, 1.0, 0.5, next(count)))
        set_grads(ens.params, result.grads)  # as the training loop does
        opt.step()

    return step


def step_memory(step: Callable[[], None], device: torch.device) -> float:
    """MiB allocated by one step beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def timed(steps: dict[str, Callable[[], None]], device: torch.device, args: argparse.Namespace
          ) -> dict[str, float]:
    for run in steps.values():
        for _ in range(args.warmup):
            run()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, run in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run()
            sync(device)
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def header(device: torch.device) -> str:
    parts = [time.strftime("%Y-%m-%d %H:%M"), f"python {platform.python_version()}",
             f"torch {torch.__version__}", platform.platform()]
    if device.type == "cuda":
        parts += [torch.cuda.get_device_name(device), f"CUDA {torch.version.cuda}",
                  f"cuDNN {torch.backends.cudnn.version()}"]
    else:
        parts.append(f"{torch.get_num_threads()} threads")
    return "# " + " · ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20", choices=list(MODELS))
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--methods", nargs="+", default=list(METHOD_TABLES),
                        choices=list(METHOD_TABLES))
    parser.add_argument("--method-variant", default="vmap+compile+bf16", choices=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 matmuls/convs")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # fp32 means fp32 unless --tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    print(header(device))
    print(f"\n{args.model}, M = {args.members}, batch {args.batch}; median of {args.repeats} "
          f"rounds × {args.steps} steps after {args.warmup} warm-up steps\n")

    steps = {v: make_step(args.model, "de", v, args.members, args.batch, device)
             for v in args.variants}
    memory = {v: step_memory(run, device) for v, run in steps.items()}
    med = timed(steps, device, args)
    print("| DE variant | ms/step | images/s | step memory MiB |\n|---|---|---|---|")
    for v, ms in med.items():
        mib = "–" if math.isnan(memory[v]) else f"{memory[v]:.0f}"
        print(f"| {v} | {ms:.1f} | {args.members * args.batch / ms * 1e3:,.0f} | {mib} |",
              flush=True)
    del steps

    methods = {m: make_step(args.model, m, args.method_variant, args.members, args.batch,
                            device) for m in args.methods}
    med = timed(methods, device, args)
    base = med.get("de", next(iter(med.values())))
    print(f"\nmethods, {args.method_variant}\n")
    print("| method | ms/step | images/s | × DE |\n|---|---|---|---|")
    for m, ms in med.items():
        print(f"| {m} | {ms:.1f} | {args.members * args.batch / ms * 1e3:,.0f} | "
              f"{ms / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
