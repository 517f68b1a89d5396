"""A model of the links between ranks, so one machine shows what communication costs on a real network.

On one host MPI moves bytes through shared memory almost for free, so bucketing, overlap and placement all
look the same. With a model switched on (`--network`, see common/comm.py), every message also takes
α + bytes/β of a modelled link, and each collective as many messages as its algorithm sends:

    all-reduce (ring)            2 (N - 1) steps of n/N bytes      2 (N - 1) (α + n / (N β))
    reduce-scatter, all-gather   N - 1 steps of n/N bytes          (N - 1) (α + n / (N β))
    gather to one rank           N - 1 blocks of n/N bytes         (N - 1) (α + n / (N β))
    broadcast (binomial tree)    ceil(log2 N) rounds of n bytes    ceil(log2 N) (α + n / β)
    send / receive               one message                       α + n / β

n is the ledger's count of the call (the whole buffer). A collective starts when its last rank arrives and
the link is free: each rank's link is one queue, so buckets launched back to back wait for each other, as on
a real wire. Ranks are grouped into simulated hosts of `ranks_per_host` consecutive world ranks; a call
whose ranks share a host uses the fast `inside` link, any other the `across` one. The model only delays: the
numbers computed are the same with it on or off.
"""
import math
import time
from dataclasses import dataclass

import numpy as np


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
    if kind in ("reduce_scatter", "allgather", "gather"):
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
