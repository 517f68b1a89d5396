"""Give each rank its share of the host's cores for BLAS, so ranks do not fight over them.

NumPy's OpenBLAS starts one thread per core in every process. Two ranks on two cores then run four BLAS
threads that spin waiting for each other: every matmul, and so every step, slows 10-30x. Each rank therefore
limits its pool to max(1, cores / ranks on this host) at start-up (NumPy is loaded before MPI starts, so the
pool is resized with threadpoolctl rather than through the environment). A thread count the user set in the
environment always wins.
"""
import os
from dataclasses import dataclass

from threadpoolctl import ThreadpoolController, threadpool_limits

ENV_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")   # OpenBLAS also reads OMP_...


@dataclass(frozen=True)
class Threads:
    host_ranks: int         # ranks of this job on this host (MPI's shared-memory group)
    cores: int              # cores this process may run on (its affinity mask)
    blas: int               # the BLAS pool size in force
    chosen_by: str          # "" when sized here, else the environment variable that set it

    def __str__(self):
        ranks = f"{self.host_ranks} rank{'s' if self.host_ranks > 1 else ''} on this host"
        pool = f"{self.blas} BLAS thread{'s' if self.blas > 1 else ''}"
        why = f"{self.chosen_by} from the environment" if self.chosen_by else f"{self.cores} cores shared"
        return f"{ranks} x {pool} ({why})"


def host_cores():
    """The cores this process may run on (a launcher that binds ranks to cores narrows it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                  # macOS has no affinity masks
        return os.cpu_count() or 1


def blas_threads():
    """The size of the BLAS pool in force (the largest, if several BLAS libraries are loaded)."""
    pools = ThreadpoolController().select(user_api="blas").info()
    return max((pool["num_threads"] for pool in pools), default=1)


def size_blas_pool(host_ranks):
    """Limit this process's BLAS pool to its share of the host's cores, unless the environment sets it."""
    cores = host_cores()
    for var in ENV_VARS:
        if os.environ.get(var, "").strip():
            return Threads(host_ranks, cores, blas_threads(), f"{var}={os.environ[var].strip()}")
    threadpool_limits(limits=max(1, cores // host_ranks), user_api="blas")
    return Threads(host_ranks, cores, blas_threads(), "")
