"""Failure drill: SIGKILL one rank of a 3D run mid-training. The launcher ends the whole job at once, the last
checkpoint survives whole, and resuming it under another layout continues exactly as an uninterrupted run.
SIGTERM, as a batch scheduler sends it before the kill, stops every rank after its step with a checkpoint of that
step, also when a second signal comes while it is written."""
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
from common.chapters import patched
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


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """The uninterrupted single-core run every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    result = run(["01_single_core/train.py", "--data-dir", tiny_data, *TINY, "--max-iters", STEPS, "--out-dir", out])
    assert result.returncode == 0, result.stderr
    return out


def grid_flags(data, out):
    return ["--data-dir", data, *TINY, "--microbatches", 2, "--tp", 2, "--pp", 2, "--max-iters", STEPS,
            "--out-dir", out]


def start_grid(script, log_path, flags=()):
    """A 4-rank run of `script` (06_3d/train.py, or a patched copy with its flags inside), its output going to
    `log_path`."""
    with open(log_path, "w") as log:           # a file, not a pipe: a full pipe would stall the ranks
        return subprocess.Popen([mpiexec_path(), "-n", "4", sys.executable, *map(str, [script, *flags])],
                                cwd=ROOT, env=script_env(), stdout=log, stderr=subprocess.STDOUT)


def ranks_at(job, script, out, log_path, step):
    """{world rank: pid} of `job` once its first checkpoint (step 5) is written and steps 5..`step` are logged:
    work the resume must redo."""
    deadline = time.monotonic() + 60
    while not ((out / "ckpt.npz").exists() and last_train_step(out / "metrics.jsonl") >= step):
        assert job.poll() is None, f"the run ended (exit {job.returncode}) too early:\n" + log_path.read_text()
        assert time.monotonic() < deadline, f"step {step} not logged after 60 s:\n" + log_path.read_text()
        time.sleep(0.05)
    ranks = rank_pids(job.pid, str(script))
    assert sorted(ranks) == [0, 1, 2, 3], ranks
    assert job.poll() is None, "the run finished too early; raise STEPS"
    return ranks


def ended(job, log_path, seconds=10):
    """The job's exit status, once it has ended; a job still running after `seconds` fails the test."""
    try:
        return job.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job still runs {seconds} s after the signal:\n" + log_path.read_text())


def drill(script, log_path, out, step, act, flags=()):
    """Start `script` on 4 ranks, call act({world rank: pid}) once step `step` is logged, and return the job's
    exit status once it has ended."""
    job = start_grid(script, log_path, flags)
    try:
        act(ranks_at(job, script, out, log_path, step))
        return ended(job, log_path)
    finally:
        if job.poll() is None:                 # a failed drill leaves no training job behind
            kill_all([*descendants(job.pid), job.pid])
            job.wait()


def resumes_exactly(tiny_data, out, straight, step):
    """The checkpoint in `out` (of `step`) resumed on 2 ranks with --dp 2 gives the uninterrupted run."""
    result = run_mpi(2, [TRAIN, "--data-dir", tiny_data, *TINY, "--microbatches", 2, "--dp", 2, "--max-iters", STEPS,
                         "--out-dir", out, "--resume"], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming at step {step}" in result.stdout
    assert_same_run(out, straight, STEPS)


def test_a_rank_killed_mid_run_ends_the_job_and_its_last_checkpoint_resumes_on_another_layout_exactly(
        tiny_data, tmp_path, straight):
    out, log_path = tmp_path / "grid", tmp_path / "launcher.log"
    # rank 1 is rank 0's tensor-parallel partner: the rank that writes checkpoints is left waiting on it
    status = drill(TRAIN, log_path, out, EVAL + 2, lambda ranks: os.kill(ranks[1], signal.SIGKILL),
                   grid_flags(tiny_data, out))
    output = log_path.read_text()
    assert status != 0, output
    assert "done in" not in output, output

    _, meta = load_checkpoint(out / "ckpt.npz")            # a torn write would raise CheckpointError here
    logged = read_metrics(out / "metrics.jsonl")
    last_val = max(r["step"] for r in logged if "val_loss" in r)
    assert max(r["step"] for r in logged) < STEPS - 1, "the kill did not land mid-run"
    # the newest checkpoint, or the one before if the kill stopped its write (rank 0 logs val before saving)
    assert 0 < meta["step"] < STEPS and last_val - EVAL <= meta["step"] <= last_val, (meta["step"], last_val)
    resumes_exactly(tiny_data, out, straight, meta["step"])


def stopped_at(out, log_path, status, script=TRAIN):
    """The step a run of `script` stopped by a signal saved, checked against what it logged and printed."""
    output = log_path.read_text()
    assert status == 143, output                            # 128 + SIGTERM, as the launcher passes it on
    stopped = [line for line in output.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1, output                        # one line, from rank 0
    _, meta = load_checkpoint(out / "ckpt.npz")
    last = last_train_step(out / "metrics.jsonl")
    assert meta["step"] == last + 1 and EVAL + 2 < meta["step"] < STEPS, (meta["step"], last)
    assert f"holds step {meta['step']}; continue with: mpirun -n 4 python {script} " in stopped[0], stopped[0]
    assert stopped[0].endswith(" --resume") and "done in" not in output, output
    return meta["step"]


def test_sigterm_on_one_rank_stops_every_rank_after_its_step_with_a_checkpoint_that_resumes_exactly(
        tiny_data, tmp_path, straight):
    out, log_path = tmp_path / "grid", tmp_path / "launcher.log"
    # a rank of the other stage, not the one that saves
    status = drill(TRAIN, log_path, out, EVAL + 3, lambda ranks: os.kill(ranks[2], signal.SIGTERM),
                   grid_flags(tiny_data, out))
    resumes_exactly(tiny_data, out, straight, stopped_at(out, log_path, status))


def test_a_second_signal_while_the_checkpoint_is_written_neither_interrupts_nor_corrupts_it(
        tiny_data, tmp_path, straight):
    """The save of the stop is held in its fsync for 2 s (a slow disk), and two more signals arrive meanwhile."""
    out, log_path, saving = tmp_path / "grid", tmp_path / "launcher.log", tmp_path / "saving"
    script = patched(tmp_path / "train.py", "import os, pathlib, time\n"
                     "loop = import_chapter('common.loop')\n"
                     "stop, fsync = loop.stop_signalled, os.fsync\n"
                     "def slow(fd):\n"
                     f"    pathlib.Path({str(saving)!r}).touch()\n"
                     "    time.sleep(2)\n"
                     "    fsync(fd)\n"
                     "def stopping(*args):\n"
                     "    os.fsync = slow\n"
                     "    stop(*args)\n"
                     "loop.stop_signalled = stopping", "06_3d.train", grid_flags(tiny_data, out))

    def signal_twice(ranks):
        os.kill(ranks[3], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not saving.exists():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.01)
        os.kill(ranks[0], signal.SIGTERM)               # the rank that writes, in the middle of writing
        os.kill(ranks[3], signal.SIGINT)

    status = drill(script, log_path, out, EVAL + 3, signal_twice)
    assert not list(out.glob("*.tmp")), list(out.iterdir())        # no half-written file left behind
    resumes_exactly(tiny_data, out, straight, stopped_at(out, log_path, status, script))
