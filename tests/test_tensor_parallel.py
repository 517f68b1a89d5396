"""Chapter 02: tensor parallelism computes exactly what single core computes, under real mpiexec runs."""

import numpy as np
import pytest

from common.chapters import import_chapter
from common.config import GPTConfig
from common.model import gpt_layout, init_params
from conftest import assert_one_error, assert_same_run, run, run_mpi, sabotaged, verdict

tp_lib = import_chapter("02_tensor_parallel.tensor_parallel")
VERIFY = "02_tensor_parallel/verify.py"
TRAIN = "02_tensor_parallel/train.py"
TINY = ["--n-layer", 2, "--n-head", 4, "--n-embd", 16, "--block-size", 8, "--batch-size", 4, "--eval-iters", 2,
        "--dtype", "float64"]


@pytest.mark.parametrize("sp", [False, True], ids=["", "sequence_parallel"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_verify_passes_for_every_tensor_and_the_ledger_at_tp(tp, sp):
    result = run_mpi(tp, [VERIFY, *(["--sequence-parallel"] if sp else [])], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"tp={tp}{' with sequence parallelism' if sp else ''}: PASS:"), last
    if tp > 1:
        assert result.stdout.count("ledger:") >= (7 if sp else 3)


@pytest.mark.parametrize("sabotage, flags", [                  # and the LayerNorms' sum: the bug gallery's
    ("tp_lib.copy_to_tp_backward = lambda dx, tp: dx", []),                 # f's backward forgets to sum
])
def test_verify_fails_when_a_communication_is_left_out(tmp_path, sabotage, flags):
    patch = "tp_lib = import_chapter('02_tensor_parallel.tensor_parallel')\n" + sabotage
    result = run_mpi(2, [sabotaged(tmp_path, patch, "02_tensor_parallel.verify", flags)], timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL:" in verdict(result)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_then_unshard_gives_back_every_single_core_tensor(tp):
    cfg = GPTConfig(n_layer=1, n_head=4, n_embd=8, block_size=4, vocab_size=11)
    full = gpt_layout(cfg).views(init_params(cfg, 0, np.float64) + np.arange(gpt_layout(cfg).size))
    local = tp_lib.tp_layout(cfg, tp)                       # from the sizes alone: the planner's, for any model
    assert {name: tp_lib.shard_tensor(name, a, cfg, tp, tp - 1).shape for name, a in full.items()} == local.shapes
    pieces = [local.views(tp_lib.shard(full, local, cfg, tp, rank, np.float64)) for rank in range(tp)]
    for name, want in full.items():
        np.testing.assert_array_equal(tp_lib.unshard_tensor(name, [p[name] for p in pieces], cfg), want)
    # every rank holds whole heads: rank r's q columns are heads r*nh/tp.. of the full q
    q = full["h.0.attn.c_attn.w"][:, :8].reshape(8, 4, 2)
    np.testing.assert_array_equal(pieces[-1]["h.0.attn.c_attn.w"][:, :8 // tp].reshape(8, 4 // tp, 2),
                                  q[:, 4 - 4 // tp:])


@pytest.mark.parametrize("n, flags, words", [
    (3, [], ["--tp 3", "n_head=4"]),
    (2, ["--tp", 4], ["--tp 4", "2 ranks"]),
    (4, ["--sequence-parallel", "--block-size", 6, "--n-head", 4], ["--sequence-parallel", "--block-size 6"]),
])
def test_bad_layout_exits_2_on_every_rank_with_one_message(tiny_data, tmp_path, n, flags, words):
    result = run_mpi(n, [TRAIN, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, *flags], timeout=60)
    assert_one_error(result, words)


def test_a_tp2_checkpoint_resumed_at_tp4_with_sequence_parallelism_continues_exactly_as_single_core(tiny_data,
                                                                                                   tmp_path):
    common = ["--data-dir", tiny_data, *TINY, "--eval-interval", 5]
    straight, sharded = tmp_path / "straight", tmp_path / "sharded"
    assert run(["01_single_core/train.py", *common, "--max-iters", 10, "--out-dir", straight]).returncode == 0
    assert run_mpi(2, [TRAIN, *common, "--max-iters", 5, "--out-dir", sharded]).returncode == 0
    result = run_mpi(4, [TRAIN, *common, "--max-iters", 10, "--out-dir", sharded, "--resume", "--sequence-parallel"])
    assert result.returncode == 0, result.stderr
    assert_same_run(sharded, straight, 10)
    sample = run(["01_single_core/sample.py", "--out-dir", sharded, "--max-new-tokens", 20, "--start", "ANNA"])
    assert sample.returncode == 0 and sample.stdout.startswith("ANNA"), sample.stderr


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallelism_keeps_one_tpth_of_every_activation_a_block_keeps(tp, recompute):
    """As Megatron: each rank keeps its part of every kept tensor, the inputs of c_attn and c_fc included (the
    backward gathers them again); verify and the runs check that the caches hold exactly these bytes."""
    from common.memory import activation_bytes
    cfg = GPTConfig(vocab_size=65)
    whole = activation_bytes(cfg, 12, cfg.n_layer, last=False, recompute=recompute)
    assert activation_bytes(cfg, 12, cfg.n_layer, last=False, tp_size=tp, sp=True, recompute=recompute) * tp == whole
    if recompute != "full":                                  # tp alone keeps the LayerNorms' and those inputs whole
        assert activation_bytes(cfg, 12, cfg.n_layer, last=False, tp_size=tp, recompute=recompute) * tp > whole
