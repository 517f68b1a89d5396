"""A model of the links between ranks, so one machine shows what communication costs on a real network.

On one host MPI moves bytes through shared memory almost for free, so bucketing, overlap and placement all
look the same. With a model switched on (`--network`, see common/comm.py), every message also takes
α + bytes/β of a modelled link, and each collective as many messages as its algorithm sends:

    all-reduce (ring)            2 (N - 1) steps of n/N bytes      2 (N - 1) (α + n / (N β))
    reduce-scatter, all-gather   N - 1 steps of n/N bytes          (N - 1) (α + n / (N β))
    all-to-all (pairwise)        N - 1 steps of n/N bytes          (N - 1) (α + n / (N β))
    gather to one rank           N - 1 blocks of n/N bytes         (N - 1) (α + n / (N β))
    broadcast (binomial tree)    ceil(log2 N) rounds of n bytes    ceil(log2 N) (α + n / β)
    send / receive               one message                       α + n / β

n is the ledger's count of the call (the whole buffer). A collective starts when its last rank arrives and
the link is free: each rank's link is one queue, so buckets launched back to back wait for each other, as on
a real wire. Ranks are grouped into simulated hosts of `ranks_per_host` consecutive world ranks; a call
whose ranks share a host uses the fast `inside` link, any other the `across` one. The model only delays: the
numbers computed are the same with it on or off. `SimulatedComm` is common.comm.Comm with the model around
every call: `simulated(comm, par)` gives the world a run uses, and its sub-communicators keep the model.
"""
import math
import time
from dataclasses import dataclass

import numpy as np

from common.comm import MPI, Comm

TIME_TAG = 1 << 14          # each message's arrival time follows it on tag + TIME_TAG


@dataclass(frozen=True)
class Link:
    latency: float          # seconds per message (α)
    bandwidth: float        # bytes per second (β)

    def time(self, nbytes):
        return self.latency + nbytes / self.bandwidth


PRESETS = {                                  # round figures of each link's latency and one-way bandwidth
    "nvlink": Link(2e-6, 150e9),
    "infiniband": Link(2e-6, 25e9),          # HDR, 200 Gbit/s
    "ethernet-10g": Link(20e-6, 1.25e9),
    "ethernet-1g": Link(50e-6, 0.125e9),
}
INSIDE = PRESETS["nvlink"]                   # between the ranks of one simulated host


def collective_time(kind, nbytes, n, link):
    """Seconds one call of `kind` on n ranks takes over `link`, for the ledger's `nbytes` (see the docstring)."""
    if n == 1:
        return 0.0
    if kind in ("allreduce", "iallreduce"):
        return 2 * (n - 1) * link.time(nbytes / n)
    if kind in ("reduce_scatter", "allgather", "gather", "alltoall"):
        return (n - 1) * link.time(nbytes / n)
    if kind == "bcast":
        return math.ceil(math.log2(n)) * link.time(nbytes)
    if kind in ("send", "isend", "recv", "irecv"):
        return link.time(nbytes)
    if kind == "barrier":
        return math.ceil(math.log2(n)) * link.latency
    raise ValueError(f"no model for {kind}")


class Network:
    """The modelled links as one process sees them, and when each is next free (its queue)."""

    def __init__(self, across, ranks_per_host=0, inside=INSIDE):
        self.across, self.inside, self.ranks_per_host = across, inside, ranks_per_host
        self.free_at = {"inside": 0.0, "across": 0.0}

    def host(self, world_rank):
        return world_rank // self.ranks_per_host if self.ranks_per_host else world_rank

    def tier(self, world_ranks):
        """"inside" if all these ranks share a simulated host, else "across"."""
        return "inside" if len({self.host(r) for r in world_ranks}) == 1 else "across"

    def occupy(self, tier, start, seconds):
        """The time a transfer of `seconds` that may begin at `start` ends, once the link is free."""
        end = max(start, self.free_at[tier]) + seconds
        self.free_at[tier] = end
        return end

    def link(self, tier):
        return self.inside if tier == "inside" else self.across

    def describe(self):
        hosts = (f"{self.ranks_per_host} ranks per simulated host (inside: {fmt(self.inside)})"
                 if self.ranks_per_host else "every rank its own simulated host")
        return f"simulated network {fmt(self.across)}, {hosts}"


def fmt(link):
    return f"{link.latency * 1e6:g} us + bytes / {link.bandwidth * 8 / 1e9:g} Gbit/s"


def from_config(par):
    """The Network of a ParallelConfig's --network, --net-latency-us, --net-gbps, --ranks-per-host (None if off)."""
    if par.network == "off":
        return None
    preset = PRESETS[par.network]
    link = Link(par.net_latency_us * 1e-6 if par.net_latency_us else preset.latency,
                par.net_gbps * 1e9 / 8 if par.net_gbps else preset.bandwidth)
    return Network(link, par.ranks_per_host)


def now():
    return time.perf_counter()              # CLOCK_MONOTONIC on Linux: one clock for every process of a host


def sleep_until(t):
    """Wait until `t`: asleep for all but the last millisecond (the kernel wakes a sleeper late by up to a
    fraction of one), then spinning, so that many short modelled messages add up to their model."""
    while (left := t - now()) > 0:
        if left > 1e-3:
            time.sleep(left - 1e-3)


class Delayed:
    """MPI requests that complete together, no earlier than `ready_at`: a time, or a one-element array that
    the requests themselves fill (a receive learns when its message arrives from the sender)."""

    def __init__(self, requests, ready_at, keep=()):
        self.requests, self.ready_at, self.keep = list(requests), ready_at, keep   # keep: buffers in flight

    def when(self):
        return float(self.ready_at[0]) if isinstance(self.ready_at, np.ndarray) else self.ready_at

    def Test(self):
        return all(r.Test() for r in self.requests) and now() >= self.when()

    def Wait(self):
        for r in self.requests:
            r.Wait()
        sleep_until(self.when())


class SimulatedComm(Comm):
    """A Comm whose every call also takes the time `network` gives it (see the module's docstring), recorded
    per kind in the ledger's "seconds". Point to point, the sender knows when its message arrives (it may begin
    once the sender's link is free) and sends that time after it; the receiver waits until then."""

    def __init__(self, mpi_comm, name, network):
        super().__init__(mpi_comm, name)
        self.network, self._tier = network, None

    def like(self, mpi_comm, name):
        return SimulatedComm(mpi_comm, name, self.network)

    def _start(self):
        """When a collective begins: as its last rank arrives (control, not payload: not in the ledger)."""
        t = np.array([now()])
        self.mpi.Allreduce(MPI.IN_PLACE, t, op=MPI.MAX)
        return float(t[0])

    def _end(self, start, kind, nbytes):
        """When the modelled transfer that may begin at `start` ends, recorded in the ledger."""
        if self._tier is None:
            members = self.mpi.Get_group().Translate_ranks(list(range(self.size)), MPI.COMM_WORLD.Get_group())
            self._tier = self.network.tier(members)
        seconds = collective_time(kind, nbytes, self.size, self.network.link(self._tier))
        self.ledger.seconds[kind] += seconds
        return self.network.occupy(self._tier, start, seconds)

    def _timed(self, kind, nbytes, call):
        """call(), a blocking collective, then wait until its modelled end."""
        if self.size == 1:
            return call()
        start = self._start()
        result = call()
        sleep_until(self._end(start, kind, nbytes))
        return result

    def _pair_end(self, peer, kind, nbytes):
        """The end of a point-to-point transfer with `peer` that may begin now."""
        world_ranks = self.mpi.Get_group().Translate_ranks([self.rank, peer], MPI.COMM_WORLD.Get_group())
        tier = self.network.tier(world_ranks)
        seconds = collective_time(kind, nbytes, 2, self.network.link(tier))
        self.ledger.seconds[kind] += seconds
        return self.network.occupy(tier, now(), seconds)

    def allreduce(self, buf, op="sum"):
        return self._timed("allreduce", buf.nbytes, lambda: super(SimulatedComm, self).allreduce(buf, op))

    def iallreduce(self, buf):
        if self.size == 1:
            return super().iallreduce(buf)
        start = self._start()
        request = super().iallreduce(buf)
        return Delayed([request], self._end(start, "iallreduce", buf.nbytes))

    def reduce_scatter(self, send, recv, counts=None):
        return self._timed("reduce_scatter", send.nbytes,
                           lambda: super(SimulatedComm, self).reduce_scatter(send, recv, counts))

    def allgather(self, send, recv, counts=None):
        return self._timed("allgather", recv.nbytes, lambda: super(SimulatedComm, self).allgather(send, recv, counts))

    def gather(self, send, recv, counts, root=0):
        return self._timed("gather", send.itemsize * sum(counts),
                           lambda: super(SimulatedComm, self).gather(send, recv, counts, root))

    def alltoall(self, send, recv, send_counts=None, recv_counts=None):
        return self._timed("alltoall", send.nbytes,
                           lambda: super(SimulatedComm, self).alltoall(send, recv, send_counts, recv_counts))

    def bcast(self, buf, root=0):
        return self._timed("bcast", buf.nbytes, lambda: super(SimulatedComm, self).bcast(buf, root))

    def barrier(self):
        if self.size > 1:
            sleep_until(self._end(self._start(), "barrier", 0))
        super().barrier()

    def send(self, buf, dest, tag=0):
        super().send(buf, dest, tag)
        arrival = np.array([self._pair_end(dest, "send", buf.nbytes)])
        self.mpi.Send(arrival, dest=dest, tag=tag + TIME_TAG)
        sleep_until(arrival[0])

    def recv(self, buf, source, tag=0):
        super().recv(buf, source, tag)
        arrival = np.empty(1)
        self.mpi.Recv(arrival, source=source, tag=tag + TIME_TAG)
        sleep_until(arrival[0])
        return buf

    def isend(self, buf, dest, tag=0):
        request = super().isend(buf, dest, tag)
        arrival = np.array([self._pair_end(dest, "isend", buf.nbytes)])
        return Delayed([request, self.mpi.Isend(arrival, dest=dest, tag=tag + TIME_TAG)], arrival[0],
                       keep=(arrival,))

    def irecv(self, buf, source, tag=0):
        request = super().irecv(buf, source, tag)
        arrival = np.full(1, np.inf)
        return Delayed([request, self.mpi.Irecv(arrival, source=source, tag=tag + TIME_TAG)], arrival)


def simulated(comm, par):
    """The communicator a run uses: `comm` itself, or, with --network, the same ranks on the simulated network
    (its host kept)."""
    network = from_config(par)
    if network is None:
        return comm
    sim = SimulatedComm(comm.mpi, comm.name, network)
    sim.host = comm.host
    return sim
