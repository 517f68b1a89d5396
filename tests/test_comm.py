"""common.comm under real MPI: failures end the whole job, collectives give NumPy's answers, the ledger counts."""
import textwrap
import time

import pytest

from conftest import run, run_mpi


# Unbuffered print() writes the text and its newline separately, and mpiexec interleaves ranks between
# writes ("aa\n\n"); one write per line keeps every rank's line whole.
SAY = "def say(line):\n    sys.stdout.write(line + '\\n')\n"


def script(tmp_path, source):
    """Write a job script for the ranks; it can call say(line) to print one whole line."""
    path = tmp_path / "job.py"
    path.write_text("import sys\n" + SAY + textwrap.dedent(source))
    return path


def test_an_exception_on_one_rank_ends_the_job_while_another_waits_in_allreduce(tmp_path):
    job = script(tmp_path, """
        import numpy as np
        import common.comm

        comm = common.comm.world()
        if comm.rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        comm.allreduce(np.ones(3))                  # rank 0 would wait here forever
    """)
    start = time.perf_counter()
    result = run_mpi(2, [job], timeout=10)
    assert time.perf_counter() - start < 10
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" in output and "RuntimeError: rank 1 fails on purpose" in output


@pytest.mark.parametrize("failing, suffix", [("{1}", "(on rank 1)"), ("{0, 1}", None)])
def test_a_config_error_on_some_ranks_makes_every_rank_exit_2_with_one_message(tmp_path, failing, suffix):
    job = script(tmp_path, f"""
        import common.comm
        from common.config import ConfigError

        def setup(rank):
            if rank in {failing}:
                raise ConfigError("--data-dir data/x not found on this host")
            return rank

        comm = common.comm.world()
        try:
            common.comm.checked(comm, setup, comm.rank)
        except SystemExit as e:
            say(f"rank {{comm.rank}} exits {{e.code}}")
            raise
        say(f"rank {{comm.rank}} went on")
    """)
    result = run_mpi(2, [job], timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert sorted(result.stdout.splitlines()) == ["rank 0 exits 2", "rank 1 exits 2"]
    # count "error:" in the whole text: two ranks printing at once could share one line
    assert result.stderr.count("error:") == 1 and result.stderr.startswith("error:")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "--data-dir data/x not found" in result.stderr
    assert (suffix in result.stderr) if suffix else "on rank" not in result.stderr


COLLECTIVES = """
    import numpy as np
    import common.comm
    from common.comm import wait_all

    comm = common.comm.world()
    r, n = comm.rank, comm.size

    def data(rank, size, dtype=np.float64):
        return (np.arange(size) * (rank + 1) + 10 * rank).astype(dtype)   # different on every rank

    def total(size, dtype=np.float64):
        return sum(data(k, size, dtype) for k in range(n))

    buf = data(r, 10)
    assert comm.allreduce(buf) is buf and np.array_equal(buf, total(10))
    comm.allreduce(buf)
    assert np.array_equal(buf, n * total(10))

    buf = data(r, 6, np.float32)
    wait_all([comm.iallreduce(buf)])
    assert np.array_equal(buf, total(6, np.float32))

    recv = np.empty(3)
    comm.reduce_scatter(data(r, 3 * n), recv)
    assert np.array_equal(recv, total(3 * n)[3 * r:3 * r + 3])

    recv = np.empty(2 * n, dtype=np.int32)
    comm.allgather(np.array([r, -r], dtype=np.int32), recv)
    assert np.array_equal(recv, np.array([[k, -k] for k in range(n)], dtype=np.int32).ravel())

    counts = [k % 3 for k in range(n)]                                   # uneven, some ranks hold nothing
    starts = np.cumsum([0] + counts)
    recv = np.empty(counts[r])
    comm.reduce_scatter(data(r, sum(counts)), recv, counts)
    assert np.array_equal(recv, total(sum(counts))[starts[r]:starts[r + 1]])
    recv = np.empty(sum(counts))
    comm.allgather(data(r, sum(counts))[starts[r]:starts[r + 1]], recv, counts)
    assert np.array_equal(recv, np.concatenate([data(k, sum(counts))[starts[k]:starts[k + 1]] for k in range(n)]))
    inplace = np.full(sum(counts), -1.0)
    inplace[starts[r]:starts[r + 1]] = r                                   # only this rank's block is filled
    comm.allgather(None, inplace, counts)
    assert np.array_equal(inplace, np.repeat(np.arange(n, dtype=np.float64), counts))
    gathered = np.zeros(sum(counts)) if r == 1 else None
    comm.gather(np.full(counts[r], float(r)), gathered, counts, root=1)
    assert r != 1 or np.array_equal(gathered, np.repeat(np.arange(n, dtype=np.float64), counts))

    recv = np.empty(2 * n)                                               # block s of rank k goes to rank s
    comm.alltoall(data(r, 2 * n), recv)
    assert np.array_equal(recv, np.concatenate([data(k, 2 * n)[2 * r:2 * r + 2] for k in range(n)]))
    sizes = [[(k + s) % 3 for s in range(n)] for k in range(n)]           # rank k sends sizes[k][s] to rank s
    mine = np.concatenate([np.full(sizes[r][s], 100.0 * r + s) for s in range(n)])
    recv = np.empty(sum(sizes[k][r] for k in range(n)))
    comm.alltoall(mine, recv, sizes[r], [sizes[k][r] for k in range(n)])
    assert np.array_equal(recv, np.concatenate([np.full(sizes[k][r], 100.0 * k + r) for k in range(n)]))

    buf = data(r, 10)
    comm.bcast(buf, root=n - 1)
    assert np.array_equal(buf, data(n - 1, 10))

    partner = r + 1 if r % 2 == 0 else r - 1                             # pairs (0, 1), (2, 3)
    got = np.empty(5)
    if r % 2 == 0:
        comm.send(data(r, 5), partner)
        comm.recv(got, partner)
    else:
        comm.recv(got, partner)
        comm.send(data(r, 5), partner)
    assert np.array_equal(got, data(partner, 5))

    got = np.empty(4, dtype=np.int64)
    wait_all([comm.isend(data(r, 4, np.int64), (r + 1) % n, tag=7), comm.irecv(got, (r - 1) % n, tag=7)])
    assert np.array_equal(got, data((r - 1) % n, 4, np.int64))

    uneven = 8 * sum(counts)
    want = {"allreduce": (2, 2 * 80), "iallreduce": (1, 6 * 4), "reduce_scatter": (2, 3 * n * 8 + uneven),
            "allgather": (3, 2 * n * 4 + 2 * uneven), "gather": (1, uneven), "bcast": (1, 80),
            "alltoall": (2, 2 * n * 8 + 8 * sum(sizes[r])), "send": (1, 40), "recv": (1, 40), "isend": (1, 32),
            "irecv": (1, 32)}
    got = {kind: (row["calls"], row["bytes"]) for kind, row in comm.ledger.as_dict().items()}
    assert got == want, (r, got)
    say(f"rank {r} of {n}: collectives ok")
"""


@pytest.mark.parametrize("n", [2, 4])
def test_collectives_match_numpy_and_the_ledger_counts_every_call_and_byte(tmp_path, n):
    result = run_mpi(n, [script(tmp_path, COLLECTIVES)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = set(result.stdout.splitlines())
    assert {f"rank {r} of {n}: collectives ok" for r in range(n)} <= lines


def test_split_gives_a_sub_communicator_with_its_own_ledger(tmp_path):
    job = script(tmp_path, """
        import numpy as np
        import common.comm

        world = common.comm.world()
        r = world.rank
        sub = world.split(color=r % 2, key=r, name="dp")
        assert (sub.name, sub.size, sub.rank) == ("dp", world.size // 2, r // 2)
        buf = np.array([float(r)])
        sub.allreduce(buf)
        assert buf[0] == sum(k for k in range(world.size) if k % 2 == r % 2)
        assert sub.ledger.as_dict() == {"allreduce": {"calls": 1, "bytes": 8}} and world.ledger.as_dict() == {}
        world.allreduce(np.zeros(4))
        assert sub.ledger.as_dict() == {"allreduce": {"calls": 1, "bytes": 8}}
        assert world.ledger.as_dict() == {"allreduce": {"calls": 1, "bytes": 32}}
        say(f"rank {r}: split ok")
    """)
    result = run_mpi(4, [job], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {f"rank {r}: split ok" for r in range(4)} <= set(result.stdout.splitlines())


def test_with_one_rank_collectives_are_no_ops_or_copies_and_the_ledger_stays_empty(tmp_path):
    job = script(tmp_path, """
        import sys

        import numpy as np
        import common.comm
        from mpi4py import MPI

        comm = common.comm.world()
        assert comm.size == 1 and sys.excepthook is sys.__excepthook__   # no abort hook for one process
        x = np.arange(6.0)
        assert comm.allreduce(x) is x and np.array_equal(x, np.arange(6.0))
        req = comm.iallreduce(x)
        assert req == MPI.REQUEST_NULL
        common.comm.wait_all([req])
        assert np.array_equal(x, np.arange(6.0))
        recv = np.empty((2, 3))
        comm.reduce_scatter(x, recv)
        assert np.array_equal(recv, x.reshape(2, 3))
        recv = np.empty(6)
        comm.allgather(x.reshape(2, 3), recv)
        assert np.array_equal(recv, x)
        assert comm.allgather(None, recv, [6]) is recv and np.array_equal(recv, x)   # in place: already there
        comm.gather(x, recv, [6])
        assert np.array_equal(recv, x)
        assert comm.alltoall(x, recv, [6], [6]) is recv and np.array_equal(recv, x)
        assert comm.bcast(x) is x and np.array_equal(x, np.arange(6.0))
        comm.barrier()
        assert comm.ledger.as_dict() == {}
        print("one rank ok")
    """)
    result = run([job], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["one rank ok"]
