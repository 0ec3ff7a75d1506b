"""Command line: ``diverse train | evaluate | predict | report | compare | posterior``.

Bad input (config keys, types, names, missing files or data) exits with code 2
and one line on stderr, before any run directory is created. A diverging run
exits with code 1 and keeps its last good checkpoint.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from diverse import rundir
from diverse.errors import DivergenceError, UserError


def _catalog() -> str:
    from diverse.data.datasets import DATASETS
    from diverse.methods.catalog import METHODS
    from diverse.nets.models import MODELS

    return (
        "datasets: " + ", ".join(sorted(DATASETS)) + "\n"
        "models:   " + ", ".join(sorted(MODELS)) + "\n"
        "methods:  " + ", ".join(sorted(METHODS)) + "\n\n"
        "examples:\n"
        "  diverse train examples/fashion_mnist_de.toml --out runs/fmnist-de\n"
        "  diverse train examples/fashion_mnist_de.toml --set ensemble.members=10 "
        "--set train.lr=0.002\n"
        "  diverse train --resume runs/fmnist-de\n"
        "  diverse evaluate runs/fmnist-de --ood digits --ood gaussian\n"
        "  diverse report runs/fmnist-de\n"
        "  diverse compare examples/fmnist_mlp_*.toml --seeds 3 --out runs/compare\n"
        "  diverse posterior examples/posterior_digits.toml --out runs/posterior\n"
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG, --set, --out, --resume, --quiet: the arguments of a training command."""
    parser.add_argument("config", nargs="?", help="TOML config (not needed with --resume)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (TOML syntax), repeatable")
    parser.add_argument("--out", help="run directory (default runs/<config>-<time>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diverse",
        description="Diverse Bayesian deep ensembles: train, evaluate and report.",
        epilog=_catalog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tr = sub.add_parser("train", help="train an ensemble from a TOML config",
                        epilog=_catalog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(tr)
    ev = sub.add_parser("evaluate", help="(re)evaluate a run: metrics.json, predictions.npz")
    ev.add_argument("run_dir")
    ev.add_argument("--ood", action="append", default=None, metavar="NAME",
                    help="OOD set to score (repeatable; default: the config's [data] ood)")
    ev.add_argument("--shift", action="store_true",
                    help="also run the corruption (16 types x 5 severities) and rotation "
                         "(0-180 deg) protocols on image data")
    ev.add_argument("--shift-examples", type=int, default=2000, metavar="N",
                    help="test images used by --shift (default 2000)")
    ev.add_argument("--predict-members", type=int, default=None, metavar="K",
                    help="hyper-he-cka runs: generate K networks for prediction (recorded "
                         "in the run's config.toml)")
    ev.add_argument("--conformal", action="append", type=float, default=[], metavar="ALPHA",
                    help="print conformal coverage and set size at miscoverage ALPHA in (0, 1) "
                         "(repeatable; calibrated on the run's validation split, [data] "
                         "validation_fraction)")
    ev.add_argument("--raps-lambda", type=float, default=None, metavar="L",
                    help="RAPS penalty weight lambda >= 0 (default 0.01)")
    ev.add_argument("--raps-k-reg", type=int, default=None, metavar="K",
                    help="RAPS: ranks beyond K are penalized, K >= 0 (default 2)")
    ev.add_argument("--quiet", action="store_true")
    pr = sub.add_parser("predict", help="predict on new inputs (.npz with an array x, in the "
                        "units of the training data) with a trained run")
    pr.add_argument("run_dir")
    pr.add_argument("inputs", metavar="INPUTS.npz")
    pr.add_argument("--out", required=True, metavar="PRED.npz",
                    help="where to write probs/logits/mean/entropy/mutual_information "
                         "(regression: means/stds/mean/std)")
    pr.add_argument("--calibration", choices=("pooled", "members", "std"), default=None,
                    help="apply the run's fitted temperature (pooled or members) or std scale")
    pr.add_argument("--conformal", action="append", type=float, default=[], metavar="ALPHA",
                    help="add conformal prediction sets (intervals) at miscoverage ALPHA")
    pr.add_argument("--score", choices=("lac", "aps", "raps"), default="aps",
                    help="conformal score of the sets (default aps)")
    rp = sub.add_parser("report", help="write report.md and plots/ for a run")
    rp.add_argument("run_dir")
    cp = sub.add_parser("compare", help="run configs x seeds (resumable) and tabulate them")
    cp.add_argument("configs", nargs="+", metavar="CONFIG")
    cp.add_argument("--seeds", type=int, default=3, help="seeds per config (default 3)")
    cp.add_argument("--out", default="runs/compare", help="folder (default runs/compare)")
    cp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override applied to every config, repeatable")
    cp.add_argument("--quiet", action="store_true")
    po = sub.add_parser("posterior", help="symmetry-aware posterior study: every Bayesian "
                        "baseline vs a reference of independently trained networks")
    po.add_argument("config", nargs="?", help="study TOML (default: digits, MLP 64-16-10)")
    po.add_argument("--out", default="runs/posterior", help="folder (default runs/posterior)")
    po.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a study value (e.g. study.seeds=1), repeatable")
    po.add_argument("--quiet", action="store_true")
    return parser


def _finish(run, run_dir: Path, quiet: bool, ood: list[str] | None = None,
            shift: int = 0, conformal_alphas: Sequence[float] = (),
            raps: tuple[float, int] | None = None) -> None:
    from diverse.evaluation.evaluate import evaluate, fit_run_calibration, write_evaluation
    from diverse.evaluation.report import write_report
    from diverse.metrics.conformal import ALPHAS

    alphas = sorted({*ALPHAS, *conformal_alphas})
    calibration = fit_run_calibration(run, *(raps or ()))
    figures, arrays = evaluate(run, ood, calibration, alphas)
    if shift > 0:
        from diverse.evaluation.shift import shift_evaluation

        shift_figures, shift_arrays = shift_evaluation(run, n=shift, show_progress=not quiet)
        figures.update(shift_figures)
        arrays.update(shift_arrays)
    write_evaluation(run_dir, figures, arrays, calibration)
    report = write_report(run_dir)
    if not quiet:
        keys = ("accuracy", "nll", "ece", "brier", "rmse")
        summary = " ".join(f"{k}={figures[k]:.4f}" for k in keys if k in figures)
        for name, row in figures.get("ood", {}).items():
            summary += f" auroc[{name}]={row['auroc']:.4f}"
        print(f"{run_dir}: {summary}")
    if conformal_alphas:
        print(conformal_summary(figures, conformal_alphas))
    if not quiet:
        print(f"report: {report}")


def conformal_summary(figures: dict, alphas: Sequence[float]) -> str:
    """The ``--conformal`` lines: coverage and set size (interval width) per level."""
    conf = figures["conformal"]
    lines = [f"conformal prediction (split conformal, {conf['validation_examples']} "
             "validation examples):"]
    for alpha in alphas:
        key = f"{float(alpha):g}"
        if "sets" in conf:
            for score, table in conf["sets"].items():
                row = table[key]
                lines.append(f"  alpha={key} {score:>4}: coverage {row['coverage']:.4f} "
                             f"(target {1 - alpha:.4f}, worst class "
                             f"{row['worst_class_coverage']:.4f}), mean set size "
                             f"{row['mean_size']:.3f}, empty {row['empty']:.4f}")
        else:
            row = conf["intervals"][key]
            width = "inf" if row["mean_width"] is None else f"{row['mean_width']:.4f}"
            lines.append(f"  alpha={key} interval: coverage {row['coverage']:.4f} "
                         f"(target {1 - alpha:.4f}), mean width {width}")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> None:
    from diverse.app.config import load_config
    from diverse.app.train import build_run, train, write_run_config

    world = os.environ.get("WORLD_SIZE", "1")
    if world not in ("", "1"):
        raise UserError(f"diverse train under torchrun (WORLD_SIZE = {world}) would make every "
                        "rank train the whole ensemble; launch `torchrun ... -m diverse.app.launch "
                        "CONFIG --out DIR` instead (docs/scaling.md)")
    if args.resume:
        run_dir = Path(args.resume)
        if args.config or args.set or args.out:
            raise UserError("--resume RUN_DIR takes its config from RUN_DIR/config.toml; "
                            "drop CONFIG, --set and --out")
        if not rundir.has(run_dir, rundir.CONFIG):
            raise UserError(f"--resume {str(run_dir)!r}: not a run directory (no config.toml)")
        cfg = load_config(rundir.path(run_dir, rundir.CONFIG))
        run = build_run(cfg)
        if not (run_dir / "checkpoints" / "latest.json").is_file():
            train(run, run_dir, show_progress=not args.quiet)  # died before epoch 1 ended
        else:
            train(run, run_dir, resume=True, show_progress=not args.quiet)
        _finish(run, run_dir, args.quiet)
        return
    if not args.config:
        raise UserError("train needs a CONFIG.toml (or --resume RUN_DIR)")
    cfg = load_config(args.config, args.set)
    run = build_run(cfg)  # every bad input fails here, before anything is written
    run_dir = Path(args.out) if args.out else (
        Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"--out {str(run_dir)!r} exists and is not empty; choose another "
                        f"folder or continue it with --resume {run_dir}")
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        write_run_config(run_dir, cfg)
        train(run, run_dir, show_progress=not args.quiet)
    except (UserError, DivergenceError):
        # nothing to resume from: leave no folder behind that would block a rerun
        if created and not (run_dir / "checkpoints" / "latest.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    _finish(run, run_dir, args.quiet)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from diverse.app.config import load_config, replace
    from diverse.app.train import load_trained, write_run_config

    run_dir = Path(args.run_dir)
    if not rundir.has(run_dir, rundir.CONFIG):
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.toml)")
    cfg = load_config(rundir.path(run_dir, rundir.CONFIG))
    if args.ood is not None:
        cfg = replace(cfg, "data", ood=tuple(args.ood))
    if args.shift_examples < 1:
        raise UserError(f"--shift-examples {args.shift_examples}: must be >= 1")
    for alpha in args.conformal:
        if not 0 < alpha < 1:
            raise UserError(f"--conformal {alpha}: the miscoverage level must be in (0, 1), "
                            "e.g. 0.1 for 90% coverage")
    from diverse.evaluation.posthoc import load_calibration
    from diverse.metrics.conformal import RAPS_K_REG, RAPS_LAMBDA

    saved = load_calibration(run_dir)  # keep the RAPS settings of an earlier evaluation
    raps = (args.raps_lambda if args.raps_lambda is not None else
            (saved.raps_lambda if saved else RAPS_LAMBDA),
            args.raps_k_reg if args.raps_k_reg is not None else
            (saved.raps_k_reg if saved else RAPS_K_REG))
    if not (raps[0] >= 0 and math.isfinite(raps[0])) or raps[1] < 0:
        raise UserError(f"--raps-lambda {raps[0]} / --raps-k-reg {raps[1]}: lambda must be a "
                        "finite number >= 0 and k_reg an integer >= 0")
    if args.conformal and not cfg.data.validation_fraction > 0:
        raise UserError(f"--conformal needs a validation split to calibrate on; {run_dir} was "
                        "trained with [data] validation_fraction = 0 (train again with e.g. "
                        "--set data.validation_fraction=0.1)")
    if args.predict_members is not None:
        if not hasattr(cfg.method, "predict_members"):
            raise UserError(f"--predict-members {args.predict_members}: only hyper-he-cka runs "
                            f"generate their members; this run's method is {cfg.method.name!r}")
        if args.predict_members < 1:
            raise UserError(f"--predict-members {args.predict_members}: must be >= 1")
        cfg = replace(cfg, "method", predict_members=args.predict_members)
    run = load_trained(run_dir, cfg)
    if args.predict_members is not None:

        saved = load_config(rundir.path(run_dir, rundir.CONFIG))  # the rest stays as saved
        rundir.remove(run_dir, rundir.METRICS)  # never metrics of another K
        write_run_config(run_dir, replace(saved, "method",
                                          predict_members=args.predict_members))
    _finish(run, run_dir, args.quiet, args.ood, args.shift_examples if args.shift else 0,
            args.conformal, raps)


def cmd_predict(args: argparse.Namespace) -> None:
    from diverse.app.predictor import predict_file

    summary = predict_file(Path(args.run_dir), Path(args.inputs), Path(args.out),
                           args.calibration, tuple(args.conformal), args.score)
    print(f"{args.out}: {summary['examples']} examples ({', '.join(summary['keys'])})")


def cmd_compare(args: argparse.Namespace) -> None:
    from diverse.app.compare import compare

    table = compare(args.configs, args.seeds, Path(args.out), args.set,
                    lambda run, run_dir: _finish(run, run_dir, True), not args.quiet)
    print(table.read_text() if not args.quiet else table)


def cmd_posterior(args: argparse.Namespace) -> None:
    from diverse.app.posterior import load_posterior_config, run_study

    table = run_study(load_posterior_config(args.config, args.set), Path(args.out),
                      not args.quiet)
    print(table.read_text() if not args.quiet else table)


def cmd_report(args: argparse.Namespace) -> None:
    from diverse.evaluation.report import write_report

    print(write_report(Path(args.run_dir)))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict,
                "report": cmd_report,
                "compare": cmd_compare, "posterior": cmd_posterior}
    return exit_code(lambda: commands[args.command](args))


def exit_code(command: Callable[[], object]) -> int:
    """Run a command; bad input → one line and 2, divergence → 1, Ctrl-C → 130, else 0."""
    try:
        command()
    except UserError as err:
        print(f"diverse: error: {err}", file=sys.stderr)
        return 2
    except DivergenceError as err:
        print(f"diverse: training diverged: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndiverse: interrupted; continue with `diverse train --resume RUN_DIR`",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
