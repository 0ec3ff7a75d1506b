"""Step time of the vectorized (vmap) vs looped ensemble, and what ``auto`` picks.

One training step = forward of all members on a shared batch of 128, the
categorical NLL, backward, and one Adam step on the stacked parameters.
For each (model, M) the two executions are timed in one process, alternating,
``--repeats`` rounds of ``--steps`` steps each; the table reports the median
ms/step ± the spread (half the inter-quartile range) and the vmap/loop ratio.
``auto`` is then resolved exactly as a run does it (a fresh ensemble timing
both on the first batch) and checked against the measured winner.

    .venv/bin/python benchmarks/ensemble_step.py                  # MLP, LeNet on CPU
    .venv/bin/python benchmarks/ensemble_step.py --models resnet20 --device cuda

Results (with machine and versions) are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from diverse.nets.ensemble import Ensemble
from diverse.nets.models import LeNetConfig, MLPConfig, ResNetConfig, build_model

MODELS = {
    "mlp": (lambda: build_model(MLPConfig(hidden=(200, 200)), (1, 28, 28), 10), (1, 28, 28)),
    "lenet5": (lambda: build_model(LeNetConfig(), (1, 28, 28), 10), (1, 28, 28)),
    "resnet20": (lambda: build_model(ResNetConfig(norm="group"), (3, 32, 32), 10), (3, 32, 32)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_fn(ens: Ensemble, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
            execution: str):
    def step() -> None:
        out = ens.apply(ens.params, x, execution=execution)
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0]))
        grads = torch.autograd.grad(loss * out.shape[0], list(ens.params.values()))
        for p, g in zip(ens.params.values(), grads, strict=True):
            p.grad = g
        opt.step()
    return step


def measure(model: str, members: int, device: torch.device, steps: int, repeats: int,
            batch: int = 128) -> dict:
    factory, shape = MODELS[model]
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    times: dict[str, list[float]] = {"loop": [], "vmap": []}
    runners = {}
    for execution in times:
        ens = Ensemble(factory, members, seed=0, execution=execution, device=device).train()
        opt = torch.optim.Adam(list(ens.params.values()), lr=1e-3)
        runners[execution] = step_fn(ens, opt, x, y, execution)
        for _ in range(3):  # warm-up
            runners[execution]()
    for _ in range(repeats):
        for execution, run in runners.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            sync(device)
            times[execution].append((time.perf_counter() - t0) / steps * 1e3)
    auto = Ensemble(factory, members, seed=0, execution="auto", device=device).train()
    picked = auto.resolved_execution(x)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0]) / 2
              if len(v) >= 2 else 0.0 for k, v in times.items()}
    faster = min(med, key=med.__getitem__)
    return {"model": model, "members": members, "device": str(device), "loop_ms": med["loop"],
            "loop_spread": spread["loop"], "vmap_ms": med["vmap"], "vmap_spread": spread["vmap"],
            "vmap_over_loop": med["vmap"] / med["loop"], "faster": faster, "auto": picked,
            "auto_ok": picked == faster or abs(med["vmap"] / med["loop"] - 1) < 0.05}


def header(device: torch.device) -> str:
    lines = [f"# {time.strftime('%Y-%m-%d')} · python {platform.python_version()} · "
             f"torch {torch.__version__} · threads {torch.get_num_threads()}",
             f"# machine: {platform.machine()} {platform.processor() or ''} "
             f"{platform.platform()}"]
    if device.type == "cuda":
        lines.append(f"# device: {torch.cuda.get_device_name()}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5"], choices=list(MODELS))
    parser.add_argument("--members", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(header(device))
    print("| model | M | loop ms/step | vmap ms/step | vmap/loop | faster | auto picks |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for model in args.models:
        for members in args.members:
            r = measure(model, members, device, args.steps, args.repeats)
            rows.append(r)
            flag = "" if r["auto_ok"] else " ✗"
            print(f"| {model} | {members} | {r['loop_ms']:.1f} ± {r['loop_spread']:.1f} | "
                  f"{r['vmap_ms']:.1f} ± {r['vmap_spread']:.1f} | {r['vmap_over_loop']:.2f} | "
                  f"{r['faster']} | {r['auto']}{flag} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"header": header(device), "rows": rows}, indent=2))
    if not all(r["auto_ok"] for r in rows):
        print("auto picked the slower execution in a case where they differ by > 5%",
              file=sys.stderr)


if __name__ == "__main__":
    main()
