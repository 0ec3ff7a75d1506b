"""Step time of an ensemble sharded over R processes against one process.

One step = the method's update on a batch shared by all members (each rank:
forward/backward of its M/R members, the gathers of the interaction terms,
the replicated M×M interaction) plus one Adam step. R ranks are started with
``torch.multiprocessing.spawn`` on one machine: gloo on CPU, NCCL on CUDA
(one GPU per rank; needs R GPUs). On CPU each rank runs
``--threads-per-rank`` torch threads (default: the cores divided by the
largest R, so that every R fits on the machine's cores). Every rank times
``--repeats`` rounds of ``--steps`` steps between barriers; rank 0 reports the
median ms/step, and the ratio to the first R measured in the same invocation.

    .venv/bin/python benchmarks/distributed_step.py                       # CPU, MLP
    .venv/bin/python benchmarks/distributed_step.py --device cuda --model resnet20 \\
        --members 8 16 --ranks 1 2 4 8

Results are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diverse.app.config import config_from_dict
from diverse.data.datasets import Dataset
from diverse.methods.base import Step, TrainingData
from diverse.methods.catalog import Method
from diverse.nets.distributed import Comm
from diverse.nets.ensemble import Ensemble
from diverse.nets.likelihoods import Categorical
from diverse.nets.models import build_model

MODELS = {"mlp": ({"name": "mlp", "hidden": [200, 200]}, (1, 28, 28)),
          "resnet20": ({"name": "resnet20", "norm": "group"}, (3, 32, 32))}
METHOD_TABLES = {
    "de": {"name": "de"},
    "wgd-kde": {"name": "wgd", "estimator": "kde"},
    "f-wgd-kde": {"name": "f-wgd", "estimator": "kde"},
    "forde-pca": {"name": "forde", "lengthscales": "pca"},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rank_steps(comm: Comm, device: torch.device, args: argparse.Namespace, model: str,
               method: str, members: int) -> list[float]:
    """ms/step of each round on this rank."""
    table, shape = MODELS[model]
    cfg = config_from_dict({"model": table, "method": METHOD_TABLES[method],
                            "ensemble": {"members": members}, "train": {"prior_std": 1.0}})
    gen = torch.Generator().manual_seed(0)  # the same data on every rank
    x_train = torch.randn(512, *shape, generator=gen)
    labels = torch.randint(0, 10, (512,), generator=gen)
    data = Dataset("bench", "classification", x_train, labels, x_train, labels, 10, {},
                   (0.0,), (1.0,))
    offset, count = comm.shard(members)
    ens = Ensemble(lambda: build_model(cfg.model, shape, 10), count, seed=0,
                   execution=args.execution, member_offset=offset, device=device).train()
    update = Method(cfg.method, TrainingData.of(data)).update
    opt = torch.optim.Adam(list(ens.params.values()), lr=1e-3)
    x, y = x_train[:args.batch].to(device), labels[:args.batch].to(device)

    def step() -> None:
        result = update(Step(ens, x, y, Categorical(), 60_000, 1.0, 0.5, comm=comm))
        for name, p in ens.params.items():
            p.grad = result.grads[name]
        opt.step()

    for _ in range(2):
        step()
    rounds = []
    for _ in range(args.repeats):
        comm.barrier()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        rounds.append((time.perf_counter() - t0) / args.steps * 1e3)
    return rounds


def worker(rank: int, ranks: int, port: int, args: argparse.Namespace, out: str) -> None:
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    torch.set_num_threads(args.threads_per_rank)
    comm = Comm()
    if ranks > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=ranks)
        comm = Comm(rank, ranks)
    lines = []
    for method in args.methods:
        for members in args.members:
            rounds = rank_steps(comm, device, args, args.model, method, members)
            lines.append(f"{method}\t{members}\t{statistics.median(rounds)}")
    if rank == 0:
        Path(out).write_text("\n".join(lines))
    if ranks > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp", choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHOD_TABLES),
                        choices=list(METHOD_TABLES))
    parser.add_argument("--members", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--execution", default="vmap", choices=["vmap", "loop"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads-per-rank", type=int, default=0,
                        help="torch threads of each rank (default: cores / largest R)")
    args = parser.parse_args()
    args.threads_per_rank = args.threads_per_rank or max(1, (os.cpu_count() or 1)
                                                         // max(args.ranks))
    print(f"# {time.strftime('%Y-%m-%d')} · python {platform.python_version()} · torch "
          f"{torch.__version__} · {platform.platform()} · {os.cpu_count()} cores · "
          f"{args.threads_per_rank} threads per rank"
          + (f" · {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    results: dict[int, dict[tuple[str, int], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            out = str(Path(tmp, f"r{ranks}.tsv"))
            mp.spawn(worker, args=(ranks, free_port(), args, out), nprocs=ranks, join=True)
            rows = [line.split("\t") for line in Path(out).read_text().splitlines()]
            results[ranks] = {(m, int(n)): float(ms) for m, n, ms in rows}
    base = args.ranks[0]
    print(f"\n{args.model}, batch {args.batch}, {args.execution}, {args.device}; median of "
          f"{args.repeats} rounds × {args.steps} steps\n")
    print("| method | M | " + " | ".join(f"R={r} ms/step" for r in args.ranks) + " | "
          + " | ".join(f"R={r} / R={base}" for r in args.ranks[1:]) + " |")
    print("|---|---|" + "---|" * (2 * len(args.ranks) - 1))
    for method in args.methods:
        for members in args.members:
            ms = [results[r][(method, members)] for r in args.ranks]
            print(f"| {method} | {members} | " + " | ".join(f"{v:.1f}" for v in ms) + " | "
                  + " | ".join(f"{v / ms[0]:.2f}" for v in ms[1:]) + " |")


if __name__ == "__main__":
    main()
