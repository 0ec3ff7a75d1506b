"""Members sharded over 2 gloo processes equal a 1-process run; resume across rank counts.

One ``torch.multiprocessing.spawn`` of 2 ranks trains every case (the slow
part is starting the processes); the 1-process references run here.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diverse.app.config import config_to_toml, load_config
from diverse.app.train import build_run, train
from diverse.checkpoint import load_checkpoint
from diverse.data.datasets import load_dataset
from diverse.errors import UserError
from diverse.nets.distributed import Comm, gather_tensors, shard_tensors

BASE = ["data.name=digits", "data.train_subset=96", "data.test_subset=64", "model.name=mlp",
        "model.hidden=[12]", "ensemble.members=4", "ensemble.execution=vmap", "train.epochs=2",
        "train.batch_size=32", "train.lr=0.01", "train.eval_every=0", "train.seed=3"]
CASES = {
    "de": ["method.name=de", "train.prior_std=1.0"],
    "wgd": ["method.name=wgd", "method.estimator=kde", "train.prior_std=1.0"],
    "f-wgd": ["method.name=f-wgd", "method.estimator=ssge", "method.context_points=8",
              "train.prior_std=1.0"],
    "forde": ["method.name=forde", "train.optimizer=sgd", "train.lr=0.05"],
    "svgd": ["method.name=svgd", "train.prior_std=1.0"],
    "f-svgd": ["method.name=f-svgd", "method.context_points=8", "train.prior_std=1.0",
               "method.output=logits"],
}
RESUMED = "wgd"  # the case interrupted after epoch 1 and resumed with 1 and 2 ranks
TOL = 1e-6


def config(case):
    return load_config(None, [*BASE, *CASES[case]])


def _worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        data = load_dataset(config("de").data)
        for case in CASES:
            train(build_run(config(case), data), Path(root, case), show_progress=False)
        # interrupted after epoch 1, then resumed with 2 ranks (1 rank: in the test)
        cut = build_run(config(RESUMED), data)

        def stop(step: int) -> None:
            if step == cut.steps_per_epoch + 1:
                raise KeyboardInterrupt

        try:
            train(cut, Path(root, "cut"), show_progress=False, on_step=stop)
        except KeyboardInterrupt:
            pass
        if rank == 0:
            shutil.copytree(Path(root, "cut"), Path(root, "cut-1rank"))
        dist.barrier()
        train(build_run(config(RESUMED), data), Path(root, "cut"), resume=True,
              show_progress=False)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHED = "wgd"  # the case also trained by `torchrun -m diverse.app.launch` (into root/launch)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank runs (a folder), the uninterrupted 1-process runs and a torchrun launch,
    all started at once (most of their time is spent importing).

    Returns ``(root, references, launch)``: references ``{case: (tensors,
    optimizer tensors, manifest)}``, launch ``(exit code, stderr)`` of torchrun.
    """
    root = tmp_path_factory.mktemp("ranks")
    config_file = root / "launch.toml"
    config_file.write_text(config_to_toml(config(LAUNCHED)))
    launch = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "diverse.app.launch", str(config_file), "--out", str(root / "launch"), "--quiet"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        ranks = mp.spawn(_worker, args=(free_port(), str(root)), nprocs=2, join=False)
        data = load_dataset(config("de").data)
        references = {}
        for case in CASES:
            run = build_run(config(case), data)
            assert run.comm.size == 1 and run.ensemble.members == 4
            train(run, root / "single" / case, show_progress=False)
            references[case] = load_checkpoint(root / "single" / case)
        while not ranks.join():
            pass
        stderr = launch.communicate(timeout=300)[1]
    finally:
        if launch.poll() is None:  # the test failed early: stop torchrun and its ranks
            launch.terminate()
            launch.wait(timeout=60)
    return root, references, (launch.returncode, stderr)


def assert_tensors_close(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert (got[k].double() - want[k].double()).abs().max() <= TOL, k


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(runs, case):
    sharded, references, _ = runs
    model, optim, manifest = load_checkpoint(sharded / case)
    ref_model, ref_optim, ref_manifest = references[case]
    assert manifest["members"] == 4 and manifest["epoch"] == 2
    assert_tensors_close(model, ref_model)  # all 4 members, gathered by rank 0
    assert_tensors_close(optim, ref_optim)
    # the epoch figures average all members (train loss) and use every member (test)
    for got, want in zip(manifest["history"], ref_manifest["history"], strict=True):
        for key in ("train_loss", "train_accuracy", "test_accuracy", "test_nll"):
            if key in want:
                assert abs(got[key] - want[key]) <= 1e-5, (case, key)
        if case != "de":  # interaction diagnostics see all members on every rank
            assert abs(got["diag_kernel_mean"] - want["diag_kernel_mean"]) <= 1e-5


def test_torchrun_launch_trains_sharded_and_evaluates_all_members(runs):
    root, references, (code, stderr) = runs
    assert code == 0, stderr[-2000:]
    model, optim, manifest = load_checkpoint(root / "launch")
    assert_tensors_close(model, references[LAUNCHED][0])
    assert_tensors_close(optim, references[LAUNCHED][1])
    figures = json.loads((root / "launch" / "metrics.json").read_text())  # rank 0, 4 members
    assert figures["members"] == 4
    reference_accuracy = references[LAUNCHED][2]["history"][-1]["test_accuracy"]
    assert abs(figures["accuracy"] - reference_accuracy) < 1e-9


def test_members_are_the_rows_of_the_one_process_ensemble():
    cfg = config("de")
    data = load_dataset(cfg.data)
    full = build_run(cfg, data).ensemble.state_tensors()
    for rank in (0, 1):
        part = build_run(cfg, data, comm=Comm(rank, 2)).ensemble
        assert part.members == 2 and part.member_offset == 2 * rank
        for k, v in part.state_tensors().items():
            assert torch.equal(v, full[k][2 * rank:2 * rank + 2]), k


@pytest.mark.parametrize("ranks", [1, 2])
def test_resume_with_another_rank_count_equals_uninterrupted(runs, ranks):
    sharded, references, _ = runs
    if ranks == 2:
        run_dir = sharded / "cut"  # resumed by the 2 ranks
    else:
        run_dir = sharded / "cut-1rank"
        assert load_checkpoint(run_dir)[2]["epoch"] == 1
        cfg = config(RESUMED)
        train(build_run(cfg, load_dataset(cfg.data)), run_dir, resume=True, show_progress=False)
    model, optim, manifest = load_checkpoint(run_dir)
    ref_model, ref_optim, _ = references[RESUMED]
    assert manifest["epoch"] == 2 and [r["epoch"] for r in manifest["history"]] == [1, 2]
    assert_tensors_close(model, ref_model)
    assert_tensors_close(optim, ref_optim)


def test_checkpoint_tensors_are_sliced_by_member_and_step_counts_kept():
    tensors = {"w": torch.arange(24.0).reshape(4, 3, 2), "w::step": torch.tensor(7.0)}
    part = shard_tensors(Comm(1, 2), tensors, members=4)
    assert torch.equal(part["w"], tensors["w"][2:4]) and part["w::step"].item() == 7.0
    assert gather_tensors(Comm(), part) == part  # one process: nothing to gather
    with pytest.raises(UserError, match="holds 4 members, the run has .* members = 6"):
        shard_tensors(Comm(0, 2), tensors, members=6)


def test_bad_sharding_is_refused_before_training():
    data = load_dataset(config("de").data)
    with pytest.raises(UserError, match="members = 3 cannot be split over 2 processes"):
        build_run(load_config(None, [*BASE, "ensemble.members=3"]), data, comm=Comm(0, 2))
    with pytest.raises(UserError, match="'he-cka' cannot run over 2 processes"):
        build_run(load_config(None, [*BASE, "method.name=he-cka"]), data, comm=Comm(1, 2))
    with pytest.raises(UserError, match="dropout over 2 processes"):
        build_run(load_config(None, [*BASE, *CASES["f-wgd"], "model.dropout=0.1"]), data,
                  comm=Comm(0, 2))
    # without shared draws (no context points, no prior) dropout is allowed
    run = build_run(load_config(None, [*BASE, "method.name=f-wgd", "model.dropout=0.1"]), data,
                    comm=Comm(0, 2))
    assert run.ensemble.members == 2
