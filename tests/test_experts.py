"""Expert parallelism (06_3d/experts.py) under MPI: a block's mixture of experts with its experts split over the
ranks computes, through the all-to-alls, what one process computes with every expert; its bytes are the
formula's; and a dispatch that returns rows out of order is caught."""
import numpy as np
import pytest

from common.chapters import import_chapter
from common.config import ConfigError, GPTConfig
from conftest import run_mpi
from test_comm import script

ep_lib = import_chapter("06_3d.experts")

JOB = """
    import numpy as np
    import common.comm
    from common.chapters import import_chapter
    from common.config import GPTConfig
    from common.model import block_shapes
    from common.moe import moe_backward, moe_forward

    ep_lib = import_chapter("06_3d.experts")
    world = common.comm.world()
    r, P = world.rank, world.size
    cfg = GPTConfig(n_embd=8, n_head=2, block_size=6, n_experts=4, top_k=2, capacity_factor=1.0, aux_loss_coef=0.1)
    rng = np.random.default_rng(0)
    p = {name: rng.normal(0.0, 0.5, shape) for name, shape in block_shapes(8, 4) if name.startswith("mlp.")}
    B = 2 * P
    h, dout = rng.normal(size=(2, B, 6, 8))

    # one process, every expert, the whole batch
    want_g = {name: np.zeros_like(w) for name, w in p.items()}
    want, cache = moe_forward(h, p, cfg)
    want_dh = moe_backward(dout, cache, p, want_g, dloss=1.0)

    # this rank: its rows of the batch, its experts; the balance term's seed its share of the batch
    rows, mine = slice(2 * r, 2 * r + 2), ep_lib.owned(4, P, r)
    p_r = {name: w[mine] if name.startswith("mlp.experts.") else w for name, w in p.items()}
    g_r = {name: np.zeros_like(w) for name, w in p_r.items()}
    experts = ep_lib.ExpertParallel(world, 4)
    SABOTAGE
    out, cache = moe_forward(h[rows], p_r, cfg, experts.pair)
    dh = moe_backward(dout[rows], cache, p_r, g_r, dloss=1.0 / P)
    world.allreduce(g_r["mlp.router.w"])                       # the router is replicated: its gradient summed

    def worst(got, want):
        return float(np.abs(got - want).max() / np.abs(want).max())

    errors = {"out": worst(out, want[rows]), "dh": worst(dh, want_dh[rows]),
              **{name: worst(g_r[name], want_g[name][mine] if name.startswith("mlp.experts.") else want_g[name])
                 for name in p}}
    kept = world.mpi.allgather(cache.routing.kept)
    n, m = ep_lib.rows_moved(kept, r, P)
    ledger = world.ledger.as_dict()["alltoall"]["bytes"]
    formula = ep_lib.comm_formula(4, [(n, m)], 8, 8)["alltoall"]
    bad = {name: e for name, e in errors.items() if not e < 1e-12}
    say(f"rank {r}: {'ok' if not bad and ledger == formula else f'FAIL {bad} {ledger} {formula}'} "
        f"dropped {int(cache.routing.chosen.sum() - cache.routing.kept.sum())}")
"""

# the combine returns each rank's rows in reverse order: the loss still falls, the outputs are other tokens'
REVERSED = """
    real = experts.forward
    def forward(xs, counts, w):
        ys, cache = real(xs, counts, w)
        return ys[::-1].copy(), cache
    experts.pair = experts.pair._replace(forward=forward)
"""


@pytest.mark.parametrize("n", [2, 4])
def test_experts_split_over_ranks_compute_what_one_process_computes_and_move_the_formulas_bytes(tmp_path, n):
    result = run_mpi(n, [script(tmp_path, JOB.replace("SABOTAGE", ""))], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = sorted(result.stdout.splitlines())
    assert [line.split(" dropped")[0] for line in lines] == [f"rank {r}: ok" for r in range(n)], lines
    assert sum(int(line.split("dropped ")[1]) for line in lines) > 0               # over capacity: some dropped


def test_a_combine_that_returns_rows_out_of_order_is_caught(tmp_path):
    job = JOB.replace("    SABOTAGE\n", REVERSED.lstrip("\n"))
    result = run_mpi(2, [script(tmp_path, job)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all("FAIL" in line and "'out'" in line for line in result.stdout.splitlines()), result.stdout


def test_the_rows_each_expert_receives_come_back_to_expert_order_and_the_layout_is_checked():
    got = np.array([[2, 0, 1], [1, 3, 0]])             # rows from source 0 and 1 for each of 3 experts
    # received: source 0's (e0 e0 e2), then source 1's (e0 e1 e1 e1): by expert, e0 from 0, 1; e1; e2
    assert ep_lib.by_expert(got).tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert ep_lib.by_expert(np.zeros((2, 2), np.int64)).tolist() == []
    cfg = GPTConfig(n_experts=4)
    for ep, dp, flag in [(3, 3, "--n-experts"), (2, 3, "--dp"), (2, 2, None)]:
        if flag:
            with pytest.raises(ConfigError, match=flag):
                ep_lib.check_layout(cfg, ep, dp)
        else:
            ep_lib.check_layout(cfg, ep, dp)
    with pytest.raises(ConfigError, match="--n-experts"):
        ep_lib.check_layout(GPTConfig(), 2, 2)
