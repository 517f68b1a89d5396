"""Thin wrappers over mpi4py's buffer-based calls that record, per communicator, the calls and bytes of each kind.

The ledger counts the payload each call acts on, from this rank's point of view: the buffer for allreduce
and bcast, the full (unsplit) buffer for reduce_scatter, allgather and gather, the message for send and recv. How
many bytes the MPI library moves on the wire for it (e.g. 2(N-1)/N of the buffer for a ring all-reduce) is
for the chapters to derive. A communicator of one rank is a no-op and records nothing.

common/network.py's SimulatedComm, a subclass chosen when a run asks for --network, makes every call also wait
the time a modelled link would take; the calls here are plain MPI.
"""
import functools
import hashlib
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass

import mpi4py
import numpy as np

# Importing MPI would start it; world() does instead, so importing this module (and any strategy module) in a
# notebook or a test starts no MPI. Left to itself, mpi4py would then not finalise at exit the MPI that
# world() started: finalize=True makes every script end MPI cleanly, as before.
mpi4py.rc(initialize=False, finalize=True)
from mpi4py import MPI  # noqa: E402

from common.config import ConfigError
from common.precision import is_sixteen
from common.threads import Threads, size_blas_pool


class Ledger:
    def __init__(self):
        self.calls = defaultdict(int)
        self.bytes = defaultdict(int)
        self.seconds = defaultdict(float)            # modelled, on a simulated network only

    def record(self, kind, nbytes):
        self.calls[kind] += 1
        self.bytes[kind] += int(nbytes)

    def reset(self):
        self.calls.clear()
        self.bytes.clear()
        self.seconds.clear()

    def as_dict(self):
        return {k: {"calls": self.calls[k], "bytes": self.bytes[k], **({"seconds": self.seconds[k]} if
                                                                        self.seconds else {})}
                for k in sorted(self.calls)}


def _buf(a, counts=None):
    """mpi4py's buffer for the array `a` (with `counts`: a vector's): MPI datatypes are inferred from NumPy's,
    but MPI has no 16-bit float, so bfloat16 and float16 travel as their bits."""
    if not is_sixteen(a.dtype):
        return a if counts is None else [a, counts]
    bits = a.view(np.uint16)
    return [bits, MPI.UINT16_T] if counts is None else [bits, counts, MPI.UINT16_T]


@functools.cache
def _sum16(dtype):
    """MPI's sum for a 16-bit float type: each pair of buffers added in float32 and the sum rounded once."""
    def add(inbuf, inoutbuf, datatype):
        a, b = np.frombuffer(inbuf, dtype), np.frombuffer(inoutbuf, dtype)
        b[...] = a.astype(np.float32) + b.astype(np.float32)
    return MPI.Op.Create(add, commute=True)


def _op(op, dtype):
    if is_sixteen(dtype):
        assert op == "sum", f"{op} of 16-bit floats"
        return _sum16(np.dtype(dtype))
    return {"sum": MPI.SUM, "max": MPI.MAX}[op]


class Comm:
    """An MPI communicator with a ledger. Buffers are NumPy arrays; MPI datatypes are inferred from them."""

    def __init__(self, mpi_comm, name="world"):
        self.mpi = mpi_comm
        self.name = name
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.ledger = Ledger()
        self.host = None        # world(): where this rank runs

    # --------------------------------------------------------------------- collectives

    def allreduce(self, buf, op="sum"):
        """Reduce `buf` over all ranks in place: op "sum" or "max"."""
        if self.size > 1:
            self.ledger.record("allreduce", buf.nbytes)
            self.mpi.Allreduce(MPI.IN_PLACE, _buf(buf), op=_op(op, buf.dtype))
        return buf

    def iallreduce(self, buf):
        """Start an in-place sum of `buf`; wait on the returned request before reading it."""
        if self.size == 1:
            return MPI.REQUEST_NULL
        self.ledger.record("iallreduce", buf.nbytes)
        return self.mpi.Iallreduce(MPI.IN_PLACE, _buf(buf), op=_op("sum", buf.dtype))

    def reduce_scatter(self, send, recv, counts=None):
        """recv = this rank's block of the sum over ranks of `send`; the blocks are equal, or rank r's is
        counts[r] elements long (in rank order)."""
        counts = self._counts(send.size, counts)
        assert recv.size == counts[self.rank]
        if self.size == 1:
            recv[...] = send.reshape(recv.shape)
            return recv
        self.ledger.record("reduce_scatter", send.nbytes)
        self.mpi.Reduce_scatter(_buf(send), _buf(recv), recvcounts=counts, op=_op("sum", send.dtype))
        return recv

    def allgather(self, send, recv, counts=None):
        """recv = the `send` blocks of every rank, concatenated in rank order; blocks are equal, or rank r's
        is counts[r] elements long. send=None: in place, this rank's block already sits in its part of recv."""
        counts = self._counts(recv.size, counts)
        assert send is None or send.size == counts[self.rank]
        if self.size == 1:
            if send is not None:
                recv[...] = send.reshape(recv.shape)
            return recv
        self.ledger.record("allgather", recv.nbytes)
        self.mpi.Allgatherv(MPI.IN_PLACE if send is None else _buf(send), _buf(recv, counts))
        return recv

    def gather(self, send, recv, counts, root=0):
        """On `root`, recv = every rank's `send` block (counts[r] elements) in rank order; recv is ignored
        elsewhere. For consolidating a sharded state on one rank."""
        assert send.size == counts[self.rank]
        if self.size == 1:
            recv[...] = send.reshape(recv.shape)
            return recv
        self.ledger.record("gather", send.itemsize * sum(counts))
        self.mpi.Gatherv(_buf(send), _buf(recv, counts) if self.rank == root else None, root=root)
        return recv

    def alltoall(self, send, recv, send_counts=None, recv_counts=None):
        """Every rank sends its r-th block of `send` to rank r and receives rank r's block for it into the r-th
        block of `recv`, all in rank order: equal blocks, or send_counts[r] / recv_counts[r] elements (the
        receive counts must match what each sender says). The ledger counts the whole send buffer."""
        send_counts, recv_counts = self._counts(send.size, send_counts), self._counts(recv.size, recv_counts)
        if self.size == 1:
            recv[...] = send.reshape(recv.shape)
            return recv
        self.ledger.record("alltoall", send.nbytes)
        self.mpi.Alltoallv(_buf(send, send_counts), _buf(recv, recv_counts))
        return recv

    def _counts(self, total, counts):
        if counts is None:
            assert total % self.size == 0, f"{total} elements do not split into {self.size} equal blocks"
            return [total // self.size] * self.size
        assert len(counts) == self.size and sum(counts) == total
        return [int(c) for c in counts]

    def bcast(self, buf, root=0):
        if self.size > 1:
            self.ledger.record("bcast", buf.nbytes)
            self.mpi.Bcast(_buf(buf), root=root)
        return buf

    # --------------------------------------------------------------------- point to point

    def send(self, buf, dest, tag=0):
        self.ledger.record("send", buf.nbytes)
        self.mpi.Send(_buf(buf), dest=dest, tag=tag)

    def recv(self, buf, source, tag=0):
        self.ledger.record("recv", buf.nbytes)
        self.mpi.Recv(_buf(buf), source=source, tag=tag)
        return buf

    def isend(self, buf, dest, tag=0):
        self.ledger.record("isend", buf.nbytes)
        return self.mpi.Isend(_buf(buf), dest=dest, tag=tag)

    def irecv(self, buf, source, tag=0):
        self.ledger.record("irecv", buf.nbytes)
        return self.mpi.Irecv(_buf(buf), source=source, tag=tag)

    def identical(self, buf):
        """Whether `buf` holds the same bytes on every rank (compares digests, not the arrays)."""
        if self.size == 1:
            return True
        digest = hashlib.sha256(np.ascontiguousarray(buf).tobytes()).digest()
        self.ledger.record("check", len(digest) * self.size)
        return len(set(self.mpi.allgather(digest))) == 1

    def agree(self, value):
        """The largest of every rank's integer `value`: a decision the ranks take together. Control, not payload:
        not in the ledger, and not delayed by a network model."""
        if self.size == 1:
            return value
        return self.mpi.allreduce(int(value), op=MPI.MAX)

    def gather_object(self, obj, root=0):
        """On `root`, the list of every rank's picklable `obj` (None elsewhere): for small records such as
        timelines, not for arrays. Not in the ledger."""
        return self.mpi.gather(obj, root=root) if self.size > 1 else [obj]

    def barrier(self):
        if self.size > 1:
            self.mpi.Barrier()

    def split(self, color, key, name):
        """A sub-communicator (with its own ledger) of the ranks that pass the same color."""
        return self.like(self.mpi.Split(color, key), name)

    def like(self, mpi_comm, name):
        """A communicator of this kind over `mpi_comm` (a simulated network's subclass keeps its model)."""
        return Comm(mpi_comm, name)


def wait_all(requests):
    """Wait for MPI requests (and a simulated network's Delayed ones)."""
    for request in requests:
        request.Wait()


def _abort_on_exception(kind, value, tb):
    traceback.print_exception(kind, value, tb)
    sys.stderr.flush()
    # Abort tears the job down at once: give the launcher a moment to forward this message, and other ranks
    # failing the same way time to finish theirs, or the one line that says what went wrong can be lost.
    time.sleep(1.0)
    MPI.COMM_WORLD.Abort(1)


@dataclass(frozen=True)
class Host:
    """The machine a rank runs on, as MPI groups ranks: those that can share memory."""
    comm: Comm              # this job's ranks on this host, in world-rank order
    index: int              # hosts numbered in the order of their lowest world rank
    threads: Threads        # this rank's BLAS pool, sized for comm.size ranks on the host


def world():
    """COMM_WORLD as a Comm (MPI starts here), with `.host` filled in and this rank's BLAS pool sized to its
    share of the host's cores. With more than one rank, an uncaught exception on any rank aborts the whole job
    instead of leaving the others waiting forever in a collective."""
    if not MPI.Is_initialized():
        MPI.Init_thread()                   # the thread level mpi4py asks for at import
    if MPI.COMM_WORLD.Get_size() > 1:
        sys.excepthook = _abort_on_exception
    comm = Comm(MPI.COMM_WORLD)
    local = Comm(comm.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank), "host")
    first = local.mpi.bcast(comm.rank, root=0) if local.size > 1 else comm.rank
    firsts = sorted(set(comm.mpi.allgather(first))) if comm.size > 1 else [first]
    comm.host = Host(local, firsts.index(first), size_blas_pool(local.size))
    return comm


def checked(comm, setup, *args):
    """Run setup(*args) on every rank before any work. If it raises ConfigError on any rank (a file missing on
    one host, say), rank 0 prints one message and every rank exits with status 2; nobody is left waiting."""
    try:
        result, error = setup(*args), None
    except ConfigError as e:
        result, error = None, str(e)
    errors = comm.mpi.allgather(error) if comm.size > 1 else [error]
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        if comm.rank == 0:
            rank, e = failed[0]
            print(f"error: {e}" + (f" (on rank {rank})" if len(failed) < comm.size else ""), file=sys.stderr)
        sys.exit(2)
    return result
