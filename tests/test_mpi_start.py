"""Importing common.comm or a strategy module starts no MPI (a notebook imports them in its kernel); world() does."""
import pytest

from conftest import run, run_mpi

STRATEGIES = ["02_tensor_parallel.tensor_parallel", "03_data_parallel.data_parallel", "04_zero.zero",
              "05_pipeline.pipeline", "06_3d.grid"]

IMPORT = """
import importlib, sys
from common.chapters import import_chapter

(import_chapter if sys.argv[1][0].isdigit() else importlib.import_module)(sys.argv[1])
MPI = sys.modules.get("mpi4py.MPI")              # imported here it would start MPI itself
print(MPI is not None and MPI.Is_initialized())
"""


# mpi4py.MPI imported on its own is the control: it starts MPI, and the check must say so
@pytest.mark.parametrize("module, started", [("common.comm", False), *((m, False) for m in STRATEGIES),
                                             ("mpi4py.MPI", True)])
def test_importing_common_comm_or_a_strategy_module_leaves_mpi_uninitialised(module, started):
    result = run(["-c", IMPORT, module], timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{started}\n"


def test_world_starts_mpi_on_every_rank_after_an_import_that_did_not_and_finalises_it_at_exit():
    job = """
import sys

import mpi4py
import common.comm
from mpi4py import MPI

before = MPI.Is_initialized()
comm = common.comm.world()
sys.stdout.write(f"rank {comm.rank} of {comm.size}: before {before}, after {MPI.Is_initialized()}, "
                 f"finalised at exit {mpi4py.rc.finalize}\\n")
"""
    result = run_mpi(2, ["-c", job], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(result.stdout.splitlines()) == [
        f"rank {r} of 2: before False, after True, finalised at exit True" for r in range(2)]
