"""Shared test helpers: run repository scripts as subprocesses (plain or under mpiexec) and a tiny dataset."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mpiexec_path():
    """The mpiexec beside this Python (the mpich wheel puts it in the virtualenv), else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    assert found, "no mpiexec: install the project (pip install -e '.[test]') so the mpich wheel provides it"
    return found


def script_env():
    # one BLAS thread per process: MPI tests put several ranks on two cores
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


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
