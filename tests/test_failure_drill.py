"""Failure drill: SIGKILL one rank of a 3D run mid-training. The launcher ends the whole job at once, the last
checkpoint survives whole, and resuming it under another layout continues exactly as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.checkpoint import load_checkpoint
from common.metrics import read_metrics
from conftest import ROOT, assert_same_run, mpiexec_path, run, run_mpi, script_env

TRAIN = "06_3d/train.py"
EVAL = 5                   # a checkpoint every 5 steps
STEPS = 500                # ~7 s uninterrupted on 4 ranks; the kill lands about 1 s in
TINY = ["--n-layer", 4, "--n-head", 4, "--n-embd", 16, "--block-size", 8, "--batch-size", 8, "--eval-iters", 2,
        "--dtype", "float64", "--eval-interval", EVAL]


def descendants(pid):
    """Every process below `pid` in the process tree, read from /proc."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass                   # a process that ended while we looked
    found, frontier = [], {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        found += frontier
    return found


def rank_pids(launcher, script):
    """{world rank: pid} of the processes running `script` below `launcher`, from the rank the launcher put in
    each one's environment (MPICH: PMI_RANK, Open MPI: OMPI_COMM_WORLD_RANK)."""
    ranks = {}
    for pid in descendants(launcher):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        rank = env.get(b"PMI_RANK", env.get(b"OMPI_COMM_WORLD_RANK"))
        if script.encode() in argv[:2] and rank is not None:
            ranks[int(rank)] = pid
    return ranks


def last_train_step(metrics):
    """The last step with a train loss in a metrics.jsonl still being written (-1 before the first)."""
    text = metrics.read_text() if metrics.exists() else ""
    complete = text.splitlines()[:text.count("\n")]        # the last line may be half written
    return max((r["step"] for r in map(json.loads, complete) if "loss" in r), default=-1)


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_rank_killed_mid_run_ends_the_job_and_its_last_checkpoint_resumes_on_another_layout_exactly(
        tiny_data, tmp_path):
    common = ["--data-dir", tiny_data, *TINY]
    out, straight, log_path = tmp_path / "grid", tmp_path / "straight", tmp_path / "launcher.log"
    with open(log_path, "w") as log:           # a file, not a pipe: a full pipe would stall the ranks
        job = subprocess.Popen([mpiexec_path(), "-n", "4", sys.executable,
                                *map(str, [TRAIN, *common, "--microbatches", 2, "--tp", 2, "--pp", 2,
                                           "--max-iters", STEPS, "--out-dir", out])],
                               cwd=ROOT, env=script_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        # kill once the first checkpoint (step 5) is written and steps 5..7 are logged: work the resume must redo
        deadline = time.monotonic() + 60
        while not ((out / "ckpt.npz").exists() and last_train_step(out / "metrics.jsonl") >= EVAL + 2):
            assert job.poll() is None, f"the run ended (exit {job.returncode}) before the kill:\n" \
                                       + log_path.read_text()
            assert time.monotonic() < deadline, f"step {EVAL + 2} not logged after 60 s:\n" + log_path.read_text()
            time.sleep(0.05)
        ranks = rank_pids(job.pid, TRAIN)
        assert sorted(ranks) == [0, 1, 2, 3], ranks
        assert job.poll() is None, "the run finished before the kill; raise STEPS"
        # rank 1 is rank 0's tensor-parallel partner: the rank that writes checkpoints is left waiting on it
        os.kill(ranks[1], signal.SIGKILL)
        try:
            job.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the job still runs 10 s after one of its ranks was killed:\n" + log_path.read_text())
    finally:
        if job.poll() is None:                 # a failed drill leaves no training job behind
            kill_all([*descendants(job.pid), job.pid])
            job.wait()
    output = log_path.read_text()
    assert job.returncode != 0, output
    assert "done in" not in output, output

    _, meta = load_checkpoint(out / "ckpt.npz")            # a torn write would raise CheckpointError here
    logged = read_metrics(out / "metrics.jsonl")
    last_val = max(r["step"] for r in logged if "val_loss" in r)
    assert max(r["step"] for r in logged) < STEPS - 1, "the kill did not land mid-run"
    # the newest checkpoint, or the one before if the kill stopped its write (rank 0 logs val before saving)
    assert 0 < meta["step"] < STEPS and last_val - EVAL <= meta["step"] <= last_val, (meta["step"], last_val)

    assert run(["01_single_core/train.py", *common, "--max-iters", STEPS, "--out-dir", straight]).returncode == 0
    result = run_mpi(2, [TRAIN, *common, "--microbatches", 2, "--dp", 2, "--max-iters", STEPS, "--out-dir", out,
                         "--resume"], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming at step {meta['step']}" in result.stdout
    assert_same_run(out, straight, STEPS)
