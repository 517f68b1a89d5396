"""Context parallelism (chapter 06): ring attention and Ulysses on each rank's positions train exactly as one core,
their traffic and activations are their formulas, the zig-zag split balances the ring's causal work, and a ring
that merges its blocks wrongly, or a Ulysses that returns the heads out of order, fails verify."""
import json

import numpy as np
import pytest

from common.chapters import import_chapter
from common.config import GPTConfig
from common.layers import attention_backward, attention_forward
from conftest import assert_one_error, assert_same_run, run, run_mpi, sabotaged, verdict

cp_lib = import_chapter("06_3d.context_parallel")
ulysses_lib = import_chapter("06_3d.ulysses")
TRAIN, VERIFY = "06_3d/train.py", "06_3d/verify.py"
TINY = ["--n-layer", 4, "--n-head", 4, "--n-embd", 16, "--block-size", 8, "--batch-size", 8, "--eval-iters", 2,
        "--dtype", "float64", "--eval-interval", 5, "--microbatches", 2]


@pytest.mark.parametrize("cp, split", [(2, "zigzag"), (4, "zigzag"), (2, "contiguous"), (4, "contiguous")])
def test_the_ranks_positions_cover_the_sequence_once_in_chunks(cp, split):
    T = 16
    held = [cp_lib.positions(T, cp, r, split) for r in range(cp)]
    assert sorted(np.concatenate(held)) == list(range(T))
    assert all(len(p) == T // cp and list(p) == sorted(p) for p in held)
    if split == "zigzag":                                   # rank r: chunks r and 2 cp - 1 - r
        assert list(held[0][:T // (2 * cp)]) == list(range(T // (2 * cp))) and held[0][-1] == T - 1


def test_zigzag_gives_every_rank_the_same_causal_work_and_contiguous_cp_times_the_first_to_the_last():
    for cp in (2, 4, 8):
        zigzag, contiguous = cp_lib.attention_work(64, cp, "zigzag"), cp_lib.attention_work(64, cp, "contiguous")
        assert len(set(zigzag)) == 1
        assert contiguous == sorted(contiguous) and contiguous[-1] == cp * contiguous[0]
        assert 64 * 65 // 2 <= sum(zigzag) <= sum(contiguous)   # the causal triangle, and the diagonal's waste:
                                                                  # smaller chunks waste less of it


@pytest.mark.parametrize("simulate", [cp_lib.simulate, ulysses_lib.simulate], ids=["ring", "ulysses"])
@pytest.mark.parametrize("cp, split", [(1, "zigzag"), (2, "zigzag"), (4, "zigzag"), (2, "contiguous"),
                                       (4, "contiguous")])
def test_the_ring_s_online_softmax_merge_and_ulysses_all_to_alls_equal_attention_in_float64(simulate, cp, split):
    rng = np.random.default_rng(0)
    qkv, dy = rng.normal(size=(2, 16, 3 * 4 * 4)), rng.normal(size=(2, 16, 4 * 4))     # 4 heads of 4 channels
    want, cache = attention_forward(qkv, 4)
    y, backward = simulate(qkv, 4, cp, split)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-14)
    np.testing.assert_allclose(backward(dy), attention_backward(dy, cache), rtol=0, atol=1e-13)


def test_the_ledger_formula_counts_each_block_s_k_and_v_round_the_ring_three_times_less_one():
    gpt_cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11)
    one = 2 * 3 * (8 // 4) * (16 // 2) * 8                  # K and V of 3 rows, 2 positions, 8 channels, float64
    got = cp_lib.comm_formula(gpt_cfg, 3, 8, cp_size=4, tp_size=2, microbatches=1)
    assert got == {"isend": 2 * one * (3 + 3 + 4), "irecv": 2 * one * (3 + 3 + 4)}
    full = cp_lib.comm_formula(gpt_cfg, 3, 8, cp_size=4, tp_size=2, recompute="full")
    assert full["isend"] == 2 * one * (2 * 3 + 3 + 4)
    assert cp_lib.comm_formula(gpt_cfg, 3, 8, cp_size=1) == {}


def test_the_ledger_formula_counts_ulysses_qkv_and_output_each_way_falling_with_cp_unlike_the_ring():
    gpt_cfg = GPTConfig(n_layer=2, n_head=8, n_embd=32, block_size=16, vocab_size=11)
    piece = 3 * (16 // 4) * (32 // 2) * 8                   # 3 rows, 4 positions, 16 channels, float64
    got = cp_lib.comm_formula(gpt_cfg, 3, 8, cp_size=4, tp_size=2, microbatches=5, mode="ulysses")
    assert got == {"alltoall": 5 * 2 * (3 + 1) * 2 * piece}          # 5 micro-batches x 2 blocks x both ways
    full = cp_lib.comm_formula(gpt_cfg, 3, 8, cp_size=4, tp_size=2, recompute="full", mode="ulysses")
    assert full == {"alltoall": 2 * (3 + 1) * 3 * piece}
    # what leaves a rank: Ulysses's all-to-alls keep 1/cp of their buffer at home, the ring sends every message
    ulysses = {cp: cp_lib.comm_formula(gpt_cfg, 3, 8, cp, mode="ulysses")["alltoall"] * (cp - 1) // cp
               for cp in (2, 4, 8)}
    ring = {cp: cp_lib.comm_formula(gpt_cfg, 3, 8, cp)["isend"] for cp in (2, 4, 8)}
    assert 4 * ulysses[4] == 3 * ulysses[2] and 16 * ulysses[8] == 7 * ulysses[2]       # (cp - 1) / cp^2
    assert ring[2] < ring[4] < ring[8] < 1.5 * ring[2]                                   # (3 cp - 2) / cp, up to 3


@pytest.mark.parametrize("flags", [
    ["--cp", 2],
    ["--cp", 4, "--cp-split", "contiguous"],
    ["--cp", 2, "--tp", 2, "--sequence-parallel"],
    ["--cp", 2, "--dp", 2, "--zero-stage", 3],
    ["--cp", 2, "--pp", 2, "--schedule", "zb-h1"],
    ["--cp", 2, "--cp-mode", "ulysses"],
    ["--cp", 2, "--tp", 2, "--sequence-parallel", "--cp-mode", "ulysses"],
], ids=["cp2", "cp4-contiguous", "cp2-tp2-sp", "cp2-dp2-zero3", "cp2-pp2-zb-h1", "cp2-ulysses", "cp2-tp2-sp-ulysses"])
def test_context_parallel_training_is_single_core_training_and_its_ledger_the_formula(tiny_data, tmp_path, flags):
    common = ["--data-dir", tiny_data, *TINY]
    straight, grid = tmp_path / "straight", tmp_path / "grid"
    assert run(["01_single_core/train.py", *common[:-2], "--max-iters", 10, "--out-dir", straight]).returncode == 0
    result = run_mpi(4, [TRAIN, *common, *flags, "--max-iters", 10, "--out-dir", grid], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cp 1, pp" in result.stdout                      # the rank map shows the cp coordinate
    ledger = json.loads((grid / "ledger.json").read_text())
    for r in ledger["ranks"]:
        assert r["comm"] == r["comm_formula"], r
        assert r["activations"] == r["activations_formula"], r
    assert_same_run(grid, straight, 10)


def test_the_ledger_shows_zigzag_balanced_and_contiguous_not(tiny_data, tmp_path):
    work = {}
    for split in ("zigzag", "contiguous"):
        result = run_mpi(4, [TRAIN, "--data-dir", tiny_data, "--out-dir", tmp_path / split, *TINY, "--cp", 4,
                             "--cp-split", split, "--max-iters", 1])
        assert result.returncode == 0, result.stdout + result.stderr
        ranks = json.loads((tmp_path / split / "ledger.json").read_text())["ranks"]
        work[split] = [r["attention_work"] for r in sorted(ranks, key=lambda r: r["cp"])]
    # one step: 2 micro-batches x 4 blocks, forward and backward, each counting its chunk pairs' n^2
    for split, got in work.items():
        assert got == [2 * 4 * 2 * w for w in cp_lib.attention_work(8, 4, split)], (split, got)
    assert max(work["zigzag"]) == min(work["zigzag"]) and max(work["contiguous"]) == 4 * min(work["contiguous"])


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_a_checkpoint_moves_from_cp_2_to_one_core_exactly(tiny_data, tmp_path, mode):
    common = ["--data-dir", tiny_data, *TINY]
    straight, grid = tmp_path / "straight", tmp_path / "grid"
    assert run(["01_single_core/train.py", *common[:-2], "--max-iters", 10, "--out-dir", straight]).returncode == 0
    first = run_mpi(2, [TRAIN, *common, "--cp", 2, "--cp-mode", mode, "--max-iters", 5, "--out-dir", grid])
    assert first.returncode == 0, first.stderr
    result = run(["01_single_core/train.py", *common[:-2], "--max-iters", 10, "--out-dir", grid, "--resume"])
    assert result.returncode == 0, result.stderr
    assert_same_run(grid, straight, 10)


def test_verify_fails_when_the_ring_forgets_to_rescale_what_it_merged(tmp_path):
    # the bug: a new block's larger row max is not applied to the sums and outputs already merged
    patch = ("cp_lib = import_chapter('06_3d.context_parallel')\n"
             "np = cp_lib.np\n"
             "def merge(m, l, o, s, v):\n"
             "    new = np.maximum(m, s.max(axis=-1, keepdims=True))\n"
             "    np.exp(s - new, out=s)\n"
             "    l += cp_lib.rowsum(s)\n"
             "    o += s @ v\n"
             "    m[...] = new\n"
             "cp_lib.merge = merge\n")
    result = run_mpi(2, [sabotaged(tmp_path, patch, "06_3d.verify", ["--cp", 2])], timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    last = verdict(result)
    assert last.startswith("2 ranks: FAIL:") and "(1,2,1,1)" in last, last            # the cp 2 layout


def test_verify_fails_when_ulysses_returns_the_heads_in_the_wrong_order(tmp_path):
    # the bug: the forward's second all-to-all puts the head groups it received back in reverse order
    patch = ("ulysses_lib = import_chapter('06_3d.ulysses')\n"
             "right = ulysses_lib.every_head\n"
             "ulysses_lib.every_head = lambda blocks, parts: right(blocks[::-1] if parts == 1 else blocks, parts)\n")
    result = run_mpi(2, [sabotaged(tmp_path, patch, "06_3d.verify", ["--cp", 2, "--cp-mode", "ulysses"])],
                     timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    last = verdict(result)
    assert last.startswith("2 ranks: FAIL:") and "(1,2,1,1) ulysses" in last, last


@pytest.mark.parametrize("n, flags, words", [
    (2, ["--cp", 2, "--block-size", 6], ["--block-size 6", "4 equal chunks", "--cp 2"]),
    (4, ["--cp", 2, "--tp", 2, "--sequence-parallel", "--block-size", 2, "--cp-split", "contiguous"],
     ["--sequence-parallel", "--tp 2", "multiple of 4"]),
    (2, ["--cp", 4], ["--cp 4", "started 2"]),
    (4, ["--cp", 4, "--n-head", 2, "--cp-mode", "ulysses"],
     ["--cp-mode ulysses", "n_head/tp = 2", "--cp 4", "choose --cp dividing 2"]),
    (2, ["--cp", 2, "--cp-mode", "ulyses"], ["--cp-mode", "ring, ulysses", "'ulyses'"]),
])
def test_bad_context_parallel_input_exits_2_on_every_rank_with_one_message(tiny_data, tmp_path, n, flags, words):
    result = run_mpi(n, [TRAIN, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, *flags, "--max-iters", 1],
                     timeout=60)
    assert_one_error(result, words)


def test_verify_refuses_ulysses_where_no_cp_divides_a_tp_rank_s_heads_and_names_the_pairs_that_do():
    result = run_mpi(4, [VERIFY, "--tp", 4, "--cp-mode", "ulysses"], timeout=60)
    assert_one_error(result, ["--cp-mode ulysses", "--tp 4", "[(1, 2), (1, 4), (2, 2)]"])
    assert result.stdout == ""                               # refused before any compute
