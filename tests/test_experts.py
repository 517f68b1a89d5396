"""Expert parallelism (06_3d/experts.py) under MPI: a block's mixture of experts with its experts split over the
ranks computes, through the all-to-alls, what one process computes with every expert; its bytes are the
formula's; and a dispatch that returns rows out of order is caught."""
import json

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


# ----------------------------------------------------------------------------- chapter 06 with --ep

TRAIN, VERIFY = "06_3d/train.py", "06_3d/verify.py"
TINY = ["--n-layer", 2, "--n-head", 2, "--n-embd", 16, "--block-size", 8, "--batch-size", 8, "--eval-iters", 2,
        "--dtype", "float64", "--eval-interval", 3, "--n-experts", 4, "--top-k", 2, "--capacity-factor", 1.0]


def test_expert_parallel_training_is_single_core_training_and_moves_between_them_exactly(tiny_data, tmp_path):
    """ep 2 (with pp 2 and zb-h1) trains as one core does, its ledger is the formula on every rank, and its
    checkpoint resumes on one core, and one core's on ep 2 with ZeRO-1 (each part's shards over its own ranks)."""
    from conftest import assert_same_run, run
    common = ["--data-dir", tiny_data, *TINY]
    straight, grid, single = tmp_path / "straight", tmp_path / "grid", tmp_path / "single"
    assert run(["01_single_core/train.py", *common, "--max-iters", 6, "--out-dir", straight]).returncode == 0
    result = run_mpi(4, [TRAIN, *common, "--pp", 2, "--ep", 2, "--schedule", "zb-h1", "--microbatches", 2,
                         "--max-iters", 3, "--out-dir", grid], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "world rank 3: tp 0, cp 0, pp 1, dp 1 (ep 1)" in result.stdout
    ranks = json.loads((grid / "ledger.json").read_text())["ranks"]
    assert all(r["comm"] == r["comm_formula"] and r["comm"]["ep"]["alltoall"] > 0 for r in ranks), ranks
    assert run(["01_single_core/train.py", *common, "--max-iters", 6, "--out-dir", grid, "--resume"]).returncode == 0
    assert_same_run(grid, straight, 6)
    assert run(["01_single_core/train.py", *common, "--max-iters", 3, "--out-dir", single]).returncode == 0
    result = run_mpi(4, [TRAIN, *common, "--ep", 2, "--zero-stage", 1, "--microbatches", 1, "--max-iters", 6,
                         "--out-dir", single, "--resume"], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_run(single, straight, 6)


@pytest.mark.parametrize("n, flags, words", [
    (4, ["--ep", 3], ["--ep 3", "--n-experts 4"]),
    (2, ["--ep", 2, "--n-experts", 0], ["--ep 2", "--n-experts"]),
    (4, ["--ep", 4, "--pp", 2], ["--ep 4", "--dp 2"]),
    (2, ["--ep", 2, "--zero-stage", 2], ["--zero-stage 2", "--ep 2", "--zero-stage 1"]),
    (2, ["--cp", 2], ["--n-experts", "--cp"]),
])
def test_bad_expert_parallel_input_exits_2_on_every_rank_with_one_message(tiny_data, tmp_path, n, flags, words):
    from conftest import assert_one_error
    result = run_mpi(n, [TRAIN, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, *flags], timeout=60)
    assert_one_error(result, words)


# the combine returns ep rank 1's rows in reverse order: other tokens' outputs, and a loss that still falls
WRONG_ORDER = """
experts = import_chapter("06_3d.experts")
real = experts.ExpertParallel.forward
def forward(self, xs, counts, w):
    ys, cache = real(self, xs, counts, w)
    return (ys[::-1].copy() if self.ep.rank == 1 else ys), cache
experts.ExpertParallel.forward = forward
"""


def test_verify_fails_when_one_ranks_tokens_come_back_in_the_wrong_order_while_its_loss_still_falls(tiny_data,
                                                                                                    tmp_path):
    from conftest import sabotaged, verdict
    from common.metrics import read_metrics
    result = run_mpi(2, [sabotaged(tmp_path, WRONG_ORDER, "06_3d.verify", ["--ep", 2])], timeout=120)
    assert result.returncode == 1 and "FAIL:" in verdict(result), result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("experts") and not line.endswith("ok")]
    assert any("params, m, v" in line for line in failed), result.stdout
    args = ["--data-dir", tiny_data, "--out-dir", tmp_path / "run", *TINY, "--ep", 2, "--max-iters", 30,
            "--learning-rate", 1e-2, "--warmup-iters", 2, "--eval-interval", 30]
    result = run_mpi(2, [sabotaged(tmp_path, WRONG_ORDER, "06_3d.train", args)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    val = [r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert val[-1] < val[0] - 0.3, val


def test_the_verify_of_experts_drops_assignments_over_capacity():
    """So verify's expert rows exercise the capacity rule: its model and batches drop some assignments."""
    verify = import_chapter("06_3d.verify")
    from common.model import gpt_forward, gpt_layout, routing
    from common.config import TrainConfig
    train_cfg = TrainConfig(batch_size=4, dtype="float64", learning_rate=1e-2, seed=0)
    run = import_chapter("01_single_core.verify").reference(verify.EXPERTS, train_cfg, 1)
    x, y = run.batches[0]
    _, _, cache = gpt_forward(gpt_layout(verify.EXPERTS).views(run.start), x, y, verify.EXPERTS)
    assert sum(int(r.chosen.sum() - r.kept.sum()) for r in map(routing, cache[1])) > 0


def test_the_all_to_all_is_a_transpose_and_experts_simulated_over_ranks_compute_what_one_process_does():
    from common.model import block_shapes
    from common.moe import experts_forward, local, route
    assert ep_lib.alltoall([["00", "01"], ["10", "11"]]) == [["00", "10"], ["01", "11"]]
    cfg = GPTConfig(n_embd=8, n_head=2, block_size=6, n_experts=4, top_k=2, capacity_factor=1.0)
    rng = np.random.default_rng(0)
    w = local({name: rng.normal(0.0, 0.5, shape) for name, shape in block_shapes(8, 4) if name.startswith("mlp.")})
    h, wr = rng.normal(size=(8, 6, 8)), rng.normal(size=(8, 4))
    for P in (2, 4):
        xs, counts = [], []
        for rows in np.split(h, P):                 # each rank routes its own rows
            _, dispatch, _, _ = route(rows, wr, cfg)
            xs.append(rows.reshape(-1, 8)[dispatch.tokens])
            counts.append(dispatch.counts)
        for got, x, c in zip(ep_lib.simulate(xs, counts, w), xs, counts):
            assert np.array_equal(got, experts_forward(x, c, w)[0])
