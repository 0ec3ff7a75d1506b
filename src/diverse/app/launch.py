"""Train one ensemble over several processes: ``torchrun … -m diverse.app.launch``.

    torchrun --nproc-per-node=4 -m diverse.app.launch CONFIG.toml --out RUN_DIR
    torchrun --nproc-per-node=4 -m diverse.app.launch --resume RUN_DIR

Each process (rank) reads the config, joins the process group torchrun
describes (NCCL on CUDA, one GPU per rank; gloo on CPU) and builds its share
of the members (:mod:`diverse.nets.distributed`). Rank 0 creates the run
directory, writes ``config.toml``, the checkpoints and the logs; after
training it evaluates the run from its final checkpoint in one process, as
``diverse evaluate RUN_DIR`` does (metrics, predictions, report). The run
directory must be visible to every machine (a shared file system): a resume
reads the checkpoint on every rank. Arguments are those of ``diverse train``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from diverse import rundir
from diverse.app.cli import add_run_arguments, exit_code
from diverse.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node=N -m diverse.app.launch",
        description="Train an ensemble sharded over the processes torchrun starts.")
    add_run_arguments(parser)
    parser.add_argument("--no-evaluate", action="store_true",
                        help="skip the evaluation after training (run `diverse evaluate` later)")
    return parser


def _run(args: argparse.Namespace) -> int:
    from diverse.app.config import load_config
    from diverse.app.train import build_run, resolve_device, train, write_run_config
    from diverse.nets import distributed

    if args.resume:
        if args.config or args.set or args.out:
            raise UserError("--resume RUN_DIR takes its config from RUN_DIR/config.toml; "
                            "drop CONFIG, --set and --out")
        run_dir = Path(args.resume)
        if not rundir.has(run_dir, rundir.CONFIG):
            raise UserError(f"--resume {str(run_dir)!r}: not a run directory (no config.toml)")
        cfg = load_config(rundir.path(run_dir, rundir.CONFIG))
    elif not args.config:
        raise UserError("launch needs a CONFIG.toml (or --resume RUN_DIR)")
    else:
        cfg = load_config(args.config, args.set)
        run_dir = Path(args.out) if args.out else (
            Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    comm = distributed.init_from_env(resolve_device(cfg.train.device))
    run = build_run(cfg)  # every bad input fails here, on every rank alike
    run_dir = Path(comm.broadcast_object(str(run_dir)))  # rank 0's clock names the run
    problem = None
    if comm.rank == 0 and not args.resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            problem = (f"--out {str(run_dir)!r} exists and is not empty; choose another folder "
                       f"or continue it with --resume {run_dir}")
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(run_dir, cfg)
    problem = comm.broadcast_object(problem)
    if problem:
        raise UserError(problem)
    resume = bool(args.resume) and (run_dir / "checkpoints" / "latest.json").is_file()
    train(run, run_dir, resume=resume, show_progress=not args.quiet)
    comm.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    if comm.rank != 0 or args.no_evaluate:
        return 0
    from diverse.app.cli import main as cli_main  # one process, all members from the checkpoint

    return cli_main(["evaluate", str(run_dir), *(["--quiet"] if args.quiet else [])])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    status: list[int] = []
    code = exit_code(lambda: status.append(_run(args)))
    return code if code else (status[0] if status else 0)


if __name__ == "__main__":
    sys.exit(main())
