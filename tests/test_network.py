"""The simulated network: each call's modelled time is the α-β formula of its algorithm, the ranks wait for it
(and computation in between hides a non-blocking call's), and the numbers are the same with it on or off."""
import numpy as np
import pytest

from common.chapters import import_chapter
from common.config import ConfigError, GPTConfig, ParallelConfig, Parser, TrainConfig, add_config_args, \
    config_from_args
from common.network import PRESETS, Link, Network, collective_time, from_config
from conftest import read_run, run_mpi
from test_comm import script

LINK = Link(latency=1e-3, bandwidth=1e8)                    # 1 ms + 10 ns per byte: large against any noise


@pytest.mark.parametrize("kind, n, want", [
    ("allreduce", 4, 2 * 3 * (1e-3 + 250_000 / 1e8)),      # ring: 2 (N-1) steps of n/N bytes
    ("iallreduce", 2, 2 * 1 * (1e-3 + 500_000 / 1e8)),
    ("reduce_scatter", 4, 3 * (1e-3 + 250_000 / 1e8)),
    ("allgather", 8, 7 * (1e-3 + 125_000 / 1e8)),
    ("alltoall", 4, 3 * (1e-3 + 250_000 / 1e8)),            # pairwise: N-1 exchanges of n/N bytes
    ("bcast", 5, 3 * (1e-3 + 1_000_000 / 1e8)),             # binomial tree: ceil(log2 5) rounds
    ("send", 2, 1e-3 + 1_000_000 / 1e8),
    ("allreduce", 1, 0.0),
])
def test_each_collective_costs_its_algorithms_alpha_beta_time(kind, n, want):
    assert collective_time(kind, 1_000_000, n, LINK) == pytest.approx(want, rel=1e-12)


def test_ranks_of_one_simulated_host_use_the_inside_link_and_a_busy_link_queues():
    net = Network(LINK, ranks_per_host=2)
    assert net.tier([0, 1]) == "inside" and net.tier([1, 2]) == "across" and net.tier([2, 3]) == "inside"
    assert Network(LINK).tier([0, 1]) == "across"           # default: every rank its own host
    assert net.occupy("across", 10.0, 2.0) == 12.0
    assert net.occupy("across", 11.0, 2.0) == 14.0          # waits for the first transfer
    assert net.occupy("inside", 11.0, 2.0) == 13.0          # another link, another queue


def parse(argv):
    parser = Parser()
    classes = GPTConfig, TrainConfig, ParallelConfig
    offer = dict(chapter="03_data_parallel", flags=import_chapter("03_data_parallel.train").FLAGS)
    add_config_args(parser, *classes, **offer)
    return config_from_args(parser.parse_args(argv), *classes, **offer)[2]


def test_a_preset_gives_the_link_and_explicit_figures_override_it():
    assert from_config(parse([])) is None
    net = from_config(parse(["--network", "ethernet-10g", "--ranks-per-host", "2"]))
    assert net.across == PRESETS["ethernet-10g"] and net.ranks_per_host == 2
    net = from_config(parse(["--network", "infiniband", "--net-latency-us", "5", "--net-gbps", "8"]))
    assert net.across.latency == pytest.approx(5e-6) and net.across.bandwidth == 1e9
    with pytest.raises(ConfigError, match="--net-gbps sets the simulated network: give --network"):
        parse(["--net-gbps", "8"])


COSTS = """
    import time
    import numpy as np
    import common.comm
    from common.comm import wait_all
    from common.network import Link, Network, SimulatedComm, collective_time

    comm = common.comm.world()
    link = Link(latency=1e-3, bandwidth=1e8)
    data = np.arange(250_000, dtype=np.float64) * (comm.rank + 1)          # 2 MB
    plain = comm.allreduce(data.copy())
    pair = comm.split(color=comm.rank // 2, key=comm.rank, name="pair")
    plain_pair = pair.allreduce(data.copy())
    comm = SimulatedComm(comm.mpi, "world", Network(link, ranks_per_host=2))
    pair = comm.split(color=comm.rank // 2, key=comm.rank, name="pair")      # inherits the model

    def timed(call):
        comm.barrier()
        t0 = time.perf_counter()
        out = call()
        return out, time.perf_counter() - t0

    got, took = timed(lambda: comm.allreduce(data.copy()))
    want = collective_time("allreduce", data.nbytes, 4, link)
    assert np.array_equal(got, plain)                                      # the model only delays
    assert comm.ledger.seconds["allreduce"] == want and want <= took < want + 0.25, (took, want)

    got, took = timed(lambda: pair.allreduce(data.copy()))
    inside = collective_time("allreduce", data.nbytes, 2, comm.network.inside)
    assert np.array_equal(got, plain_pair) and pair.ledger.seconds["allreduce"] == inside and took < 0.05

    # a non-blocking sum completes no earlier than its modelled time, which work done meanwhile hides
    buf = data.copy()
    t0 = time.perf_counter()
    request = comm.iallreduce(buf)
    modelled = collective_time("iallreduce", data.nbytes, 4, link)
    time.sleep(0.8 * modelled)                                             # "compute" while the sum runs
    wait_all([request])
    took = time.perf_counter() - t0
    assert np.array_equal(buf, plain) and modelled <= took < modelled + 0.25, (took, modelled)

    # a message arrives its modelled time after it was sent, however early the receiver waits (the barrier
    # lines the two up to within a few milliseconds, even when ranks share cores)
    comm.barrier()
    if comm.rank in (1, 2):
        got = np.empty_like(data)
        t0 = time.perf_counter()
        if comm.rank == 1:
            wait_all([comm.isend(data, 2, tag=3)])
        else:
            comm.recv(got, 1, tag=3)
            assert np.array_equal(got, np.arange(250_000, dtype=np.float64) * 2)
        took = time.perf_counter() - t0
        want = collective_time("send", data.nbytes, 2, link)
        assert want - 5e-3 <= took < want + 0.25, (comm.rank, took, want)
    say(f"rank {comm.rank}: modelled")
"""


def test_calls_wait_their_modelled_time_and_return_the_same_numbers(tmp_path):
    result = run_mpi(4, [script(tmp_path, COSTS)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(result.stdout.split("\n")[:-1]) == [f"rank {r}: modelled" for r in range(4)]


TINY = ["--n-layer", 2, "--n-head", 2, "--n-embd", 16, "--block-size", 8, "--batch-size", 8, "--eval-iters", 2,
        "--dtype", "float64", "--eval-interval", 3, "--max-iters", 6, "--check-replicas", 0]


@pytest.mark.parametrize("script_args, on_args, n", [
    (["03_data_parallel/train.py", "--dp-mode", "overlapped"], [], 2),
    (["06_3d/train.py", "--tp", 2, "--pp", 2, "--microbatches", 2], ["--ranks-per-host", 2], 4),
])
def test_training_on_a_simulated_network_computes_bit_for_bit_what_it_computes_without(tiny_data, tmp_path,
                                                                                        script_args, on_args, n):
    off, on = tmp_path / "off", tmp_path / "on"
    common = [*script_args[:1], "--data-dir", tiny_data, *TINY, *script_args[1:]]
    assert run_mpi(n, [*common, "--out-dir", off], timeout=120).returncode == 0
    result = run_mpi(n, [*common, "--out-dir", on, "--network", "ethernet-1g", *on_args], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "simulated network 50 us + bytes / 1 Gbit/s" in result.stdout
    losses_on, val_on, tensors_on = read_run(on)
    losses_off, val_off, tensors_off = read_run(off)
    assert losses_on == losses_off and val_on == val_off and len(losses_on) == 6
    assert all(np.array_equal(tensors_on[k], tensors_off[k]) for k in tensors_off.files if k != "meta")
