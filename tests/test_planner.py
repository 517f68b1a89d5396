"""Chapter 06's layout planner: its predictions are what the grid's ledgers measure, and it recommends a
layout that fits. (Its bytes come from grid.ledger_formula, which test_3d checks against the measured ledger of
every rank of every layout of 8 ranks; here the planner's own numbers meet real runs.)"""
import dataclasses
import json

import pytest

from common.chapters import import_chapter
from common.config import GPTConfig, ParallelConfig, TrainConfig
from common.data import load_meta
from conftest import assert_one_error, run, run_mpi

grid_lib = import_chapter("06_3d.grid")
planner = import_chapter("06_3d.planner")
train3d = import_chapter("06_3d.train")
GPT = GPTConfig(n_layer=4, n_head=4, n_embd=16, block_size=8, vocab_size=11)
TINY = ["--n-layer", 4, "--n-head", 4, "--n-embd", 16, "--block-size", 8, "--batch-size", 8, "--eval-iters", 1,
        "--eval-interval", 1000, "--microbatches", 2, "--max-iters", 1]


@pytest.mark.parametrize("tp, cp, pp, dp, zero, recompute", [(2, 1, 2, 1, 0, "full"), (2, 1, 1, 2, 3, "selective"),
                                                             (1, 1, 2, 2, 1, "none"), (1, 2, 1, 2, 3, "none")])
def test_the_predicted_bytes_model_state_and_activations_are_what_a_real_run_measures(tiny_data, tmp_path, tp, cp,
                                                                                      pp, dp, zero, recompute):
    result = run_mpi(4, ["06_3d/train.py", "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, "--tp", tp,
                         "--cp", cp, "--pp", pp, "--dp", dp, "--zero-stage", zero, "--recompute", recompute],
                     timeout=120)
    assert result.returncode == 0, result.stderr
    ranks = json.loads((tmp_path / "ledger.json").read_text())["ranks"]
    gpt_cfg = dataclasses.replace(GPT, vocab_size=load_meta(tiny_data)["vocab_size"])     # as the run took it
    train_cfg = TrainConfig(batch_size=8, recompute=recompute)
    par = ParallelConfig(tp=tp, cp=cp, pp=pp, dp=dp, zero_stage=zero, microbatches=2)
    predicted = planner.predict(gpt_cfg, train_cfg, par)
    for axis in planner.AXES:
        assert predicted["axes"][axis] == max(sum(r["comm"].get(axis, {}).values()) for r in ranks), axis
    for r in ranks:
        want = train3d.memory_estimate(gpt_cfg, train_cfg, par, r["rank"])
        m_and_v = want["optimizer"] * 2 // 3                                 # the estimate adds AdamW's work array
        assert m_and_v - 2 * 4 * dp * cp <= r["optimizer"] <= m_and_v, r     # a shard rounds up: ceil(n / dp cp)
        assert r["activations"] == r["activations_formula"] == want["activations"], r
        if zero == 0:
            assert (r["parameters"], r["gradients"]) == (want["parameters"], want["gradients"]), r
        else:                                                                # plus a bucket, or a gathered part
            assert r["parameters"] <= want["parameters"] and r["gradients"] <= want["gradients"], r
    assert predicted["memory"] == max(sum(train3d.memory_estimate(gpt_cfg, train_cfg, par, k).values())
                                      for k in range(4))


def test_planning_ulysses_keeps_the_layouts_whose_cp_divides_a_tp_rank_s_heads_and_counts_its_all_to_alls():
    rows, _ = planner.plan(GPT, TrainConfig(batch_size=16), 8, 2, cp_mode="ulysses")
    split = {(r["tp"], r["cp"]) for r in rows if r["cp"] > 1}
    assert split == {(1, 2), (1, 4), (2, 2)}                           # 4 heads: cp divides 4 / tp
    for r in rows:
        want = grid_lib.cp_lib.comm_formula(GPT, 16 // (r["dp"] * 2), 4, r["cp"], r["tp"], blocks=4 // r["pp"],
                                            microbatches=2, mode="ulysses")
        assert r["axes"]["cp"] == sum(want.values()), r


def test_every_layout_the_grid_accepts_is_planned_and_a_fitting_one_recommended():
    rows, best = planner.plan(GPT, TrainConfig(batch_size=16), 8, 2, ranks_per_host=4, budget=2 ** 40)
    got = {(r["tp"], r["pp"], r["dp"]) for r in rows if r["cp"] == 1}
    assert got == {(1, 1, 8), (1, 2, 4), (1, 4, 2), (2, 1, 4), (2, 2, 2), (2, 4, 1), (4, 1, 2), (4, 2, 1)}
    assert {r["cp"] for r in rows} == {1, 2, 4}                        # 8 positions: 2 cp chunks of 2 or 1
    assert not any(r["zero"] > 1 and r["pp"] > 1 for r in rows)        # the grid refuses those
    assert (best["tp"], best["pp"], best["dp"], best["zero"]) == (1, 1, 8, 0)   # plenty of memory: plain DP
    small = min(r["memory"] for r in rows)
    rows, best = planner.plan(GPT, TrainConfig(batch_size=16), 8, 2, ranks_per_host=4, budget=small)
    assert best["memory"] <= small and best["fits"]                   # the one that fits, whatever it splits


def test_the_planner_prints_a_table_and_the_command_to_run():
    result = run(["06_3d/planner.py", "-n", 4, "--ranks-per-host", 2])
    assert result.returncode == 0, result.stderr
    assert "recommended: mpirun -n 4 python 06_3d/train.py --tp 1 --pp 1 --dp 4" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line[:3].strip().isdigit()]) >= 6


def test_a_batch_no_layout_can_split_is_one_error_line():
    assert_one_error(run(["06_3d/planner.py", "-n", 3, "--batch-size", 5]), ["--batch-size 5", "multiple of 12"])


def test_the_layout_figure_reads_each_axis_of_a_ledger_from_its_busiest_rank_as_the_planner_predicts():
    layouts = import_chapter("bench.layouts")                      # pp 4: the middle stages send the most on pp,
    par = ParallelConfig(tp=1, pp=4, dp=1, microbatches=2)         # the end stages alone sum wte (ends)
    ledger = {"ranks": [{"rank": r, "comm": grid_lib.ledger_formula(GPT, par, r, 8, 4)} for r in range(4)]}
    predicted = planner.predict(GPT, TrainConfig(batch_size=8), par)["axes"]
    assert layouts.ledger_axes(ledger) == {axis: predicted[axis] for axis in layouts.AXES}   # (the figure has no cp)


def test_a_context_too_long_for_every_unsplit_sequence_is_planned_with_context_parallelism():
    gpt_cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=512, vocab_size=11)
    rows, best = planner.plan(gpt_cfg, TrainConfig(batch_size=4), 4, 1, budget=2 ** 40)
    assert best["cp"] == 1                                            # memory to spare: no sequence split
    unsplit = min(r["memory"] for r in rows if r["cp"] == 1)
    rows, best = planner.plan(gpt_cfg, TrainConfig(batch_size=4), 4, 1, budget=unsplit - 1)
    assert best is not None and best["cp"] > 1 and best["memory"] < unsplit, best


def test_a_mixture_of_experts_too_large_for_each_rank_is_planned_with_its_experts_split_over_ep():
    gpt_cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=11, n_experts=8, top_k=1)
    rows, best = planner.plan(gpt_cfg, TrainConfig(batch_size=8), 4, 1, budget=2 ** 40, at_scale=True)
    assert best["ep"] == 1 and {r["ep"] for r in rows} == {1, 2, 4}
    whole = {r["ep"]: r["memory"] for r in rows if (r["tp"], r["pp"], r["dp"], r["zero"]) == (1, 1, 4, 0)}
    assert whole[4] < whole[2] < whole[1]                             # each rank holds 1/ep of the experts
    assert all(r["axes"]["ep"] > 0 for r in rows if r["ep"] > 1) and all(r["axes"]["ep"] == 0 for r in rows
                                                                         if r["ep"] == 1)
    rows, best = planner.plan(gpt_cfg, TrainConfig(batch_size=8), 4, 1, budget=whole[2] - 1, at_scale=True)
    assert best is not None and best["ep"] == 4 and best["memory"] < whole[2], best


GPT3 = ["-n", 1024, "--n-layer", 96, "--n-head", 96, "--n-embd", 12288, "--block-size", 2048, "--vocab-size", 50257,
        "--batch-size", 1536, "--micro-batch-size", 1, "--memory-per-rank", 80, "--ranks-per-host", 8,
        "--recompute", "selective", "--sequence-parallel"]


def test_the_planner_plans_gpt3_175b_on_1024_ranks_from_the_sizes_alone():
    """No array of the model is made: every layout of 1024 ranks is planned from the sizes (seconds, a few MB)."""
    result = run(["06_3d/planner.py", *GPT3, "--at-scale"], timeout=300)
    assert result.returncode == 0, result.stderr
    command = result.stdout.split("recommended: mpirun -n 1024 python 06_3d/train.py ")[1].split()
    assert int(command[command.index("--tp") + 1]) in (1, 2, 4, 8), command          # tp inside a host of 8
    rows = [line.split() for line in result.stdout.splitlines()[2:]
            if line.split() and all(word.isdigit() for word in line.split()[:6])]
    assert len(rows) > 300 and any("fit" in row for row in rows)                      # some do not fit
    whole = run(["06_3d/planner.py", *GPT3], timeout=300)                   # every rank drawing the whole model
    assert whole.returncode == 0 and "no layout fits in memory" in whole.stdout, whole.stdout[-500:]
