"""Shared test helpers: run repository scripts as subprocesses (plain or under mpiexec) and a tiny dataset."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.chapters import patched
from common.notebook import mpiexec
from common.threads import ENV_VARS

ROOT = Path(__file__).resolve().parents[1]


mpiexec_path = mpiexec                 # the one the notebooks use: beside this Python, else on PATH
THREAD_VARS = ENV_VARS                 # the variables a user sets to size BLAS pools (common/threads.py)


def script_env():
    """The environment a reader's shell gives: no thread variables, so every script sizes its BLAS pool itself
    (common/threads.py) exactly as it does for a reader."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    return {**env, "PYTHONUNBUFFERED": "1"}


def run(args, timeout=120, cwd=ROOT):
    """Run `python *args` from the repository root; returns the CompletedProcess (text output captured)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_mpi(n, args, timeout=120, cwd=ROOT):
    """Run `mpiexec -n n python *args`; a hang fails the test through the timeout instead of stalling it."""
    return subprocess.run([mpiexec_path(), "-n", str(n), sys.executable, *map(str, args)], cwd=cwd,
                          env=script_env(), capture_output=True, text=True, timeout=timeout)


def assert_one_error(result, words):
    """Exit status 2 and exactly one `error:` line on stderr (from rank 0 alone), containing every word."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.fixture(scope="session")
def figures(tmp_path_factory):
    """bench/figures.py run once on a short setting (20 steps) into a temporary folder: the figures the READMEs
    show and the bug gallery's verdicts (figures/gallery.json)."""
    out = tmp_path_factory.mktemp("figures")
    result = run(["bench/figures.py", "--steps", 20, "--out-root", out], timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def sabotaged(tmp_path, patch, script, args=()):
    """A script that runs `patch` (Python lines, with import_chapter in scope), then `script`'s main(args): how
    a test shows that a check fails once the code it guards is broken."""
    return patched(tmp_path / "sabotaged.py", patch, script, args)


def verdict(result):
    return result.stdout.strip().splitlines()[-1]


def read_run(out):
    """The train losses and the val losses of a run's metrics.jsonl, and its checkpoint's arrays."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r],
            np.load(out / "ckpt.npz"))


def assert_same_run(got_dir, want_dir, steps):
    """Two runs logged the same `steps` train losses and val losses, and saved the same tensors, to 1e-10
    (float64 runs)."""
    want_losses, want_val, want = read_run(want_dir)
    got_losses, got_val, got = read_run(got_dir)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-10, atol=0)
    np.testing.assert_allclose(got_val, want_val, rtol=1e-10, atol=0)
    assert len(got_losses) == steps and len(got_val) > 1
    for key in want.files:
        if key != "meta":
            np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-10 * np.abs(want[key]).max(),
                                       err_msg=key)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small generated corpus prepared by data/prepare.py: a dataset folder for fast training runs."""
    root = tmp_path_factory.mktemp("tiny_data")
    lines = [f"{['ANNA', 'BEN', 'CORA'][i % 3]}: the {i % 11} fair {'moon' if i % 2 else 'sun'} is set!"
             for i in range(400)]
    source = root / "corpus.txt"
    source.write_text("\n".join(lines) + "\n")
    out = root / "data"
    result = run(["data/prepare.py", "--source", source, "--out-dir", out, "--no-verify"])
    assert result.returncode == 0, result.stderr
    return out
