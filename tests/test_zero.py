"""Chapter 04: every ZeRO stage equals single core, holds what the paper says it holds, and resumes anywhere."""

import numpy as np
import pytest

from common.chapters import import_chapter
from common.config import TrainConfig
from common.params import Layout
from common.precision import widths
from conftest import assert_one_error, assert_same_run, run, run_mpi, sabotaged, verdict

VERIFY = "04_zero/verify.py"
TRAIN = "04_zero/train.py"
TINY = ["--n-layer", 2, "--n-head", 2, "--n-embd", 16, "--block-size", 8, "--batch-size", 8, "--eval-iters", 2,
        "--dtype", "float64", "--eval-interval", 5]
zero_lib = import_chapter("04_zero.zero")


def test_shards_cover_the_buffer_once_and_straddling_tensors_are_cut_at_the_right_element():
    layout = Layout([("a", (2, 3)), ("b", (5,)), ("c", (4,))])        # 15 elements
    bounds = zero_lib.shard_bounds(layout.size, 4)
    assert bounds == [0, 3, 7, 11, 15]
    assert zero_lib.overlap_counts(bounds, 5, 12) == [0, 2, 4, 1]
    tensors = {"a": np.arange(6.0).reshape(2, 3), "b": np.arange(6.0, 11), "c": np.arange(11.0, 15)}
    shards = [np.empty(hi - lo) for lo, hi in zip(bounds, bounds[1:])]
    for (lo, hi), out in zip(zip(bounds, bounds[1:]), shards):
        zero_lib.take_shard(layout, tensors, lo, hi, out)
    assert np.array_equal(np.concatenate(shards), np.arange(15.0))
    assert zero_lib.runs(layout, ["c", "a"]) == [(0, 6, ["a"]), (11, 15, ["c"])]
    assert zero_lib.runs(layout, ["b", "a"]) == [(0, 11, ["a", "b"])]


def test_the_memory_formula_is_the_papers_for_float32():
    psi, n = 1000, 4
    per_stage = [sum(zero_lib.memory_formula(stage, psi, psi / n, 4).values()) for stage in range(4)]
    assert per_stage == [16 * psi, 8 * psi + 8 * psi / n, 4 * psi + 12 * psi / n, 16 * psi / n]


def test_the_memory_formula_in_mixed_precision_gives_the_papers_table():
    """Rajbhandari et al., Figure 1: a 7.5B model on 64 GPUs holds 120, 31.4, 16.6 and 1.9 GB per GPU of model
    states (2 + 2 + 12 bytes a parameter); Table 1's 1T model on 1024 GPUs, 15.6 GB at stage 3."""
    mixed = widths(TrainConfig(precision="bf16"))
    psi, n = 7.5e9, 64
    per_stage = [sum(zero_lib.memory_formula(stage, psi, psi / n, mixed).values()) / 1e9 for stage in range(4)]
    assert [round(gb, 1) for gb in per_stage] == [120.0, 31.4, 16.6, 1.9]
    assert round(sum(zero_lib.memory_formula(3, 1e12, 1e12 / 1024, mixed).values()) / 1e9, 1) == 15.6


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_verify_passes_for_every_stage_and_accumulation_on_n_ranks(n):
    result = run_mpi(n, [VERIFY], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(f"N={n}: PASS:")


PRELUDE = "import common.model as model\nzero_lib = import_chapter('04_zero.zero')\n"


def test_verify_fails_when_one_bucket_is_not_reduce_scattered(tmp_path):
    patch = ("f = zero_lib.Zero._reduce_scatter\n"
             "zero_lib.Zero._reduce_scatter = lambda self, i: None if i == 0 else f(self, i)   # the last layers")
    result = run_mpi(2, [sabotaged(tmp_path, PRELUDE + patch, "04_zero.verify")], timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    worst = verdict(result).split("exceed 1e-10: ")[1].split(", ")[0]          # e.g. "stage 1 x1: m ln_f.b"
    assert worst.split()[-1] in {"h.1.mlp.c_proj.w", "h.1.mlp.c_proj.b", "ln_f.w", "ln_f.b"}, verdict(result)


def test_verify_fails_when_a_cache_keeps_a_gathered_weight_alive(tmp_path):
    """The bug layernorm_forward had before ZeRO-3: its cache held its weight, so each gathered block stayed
    in memory until its backward. Every result is still exact; only the measured peak shows it (and in bf16,
    where the cache keeps a 16-bit copy of the weight, the caches' bytes at every stage)."""
    patch = ("fwd, bwd = model.layernorm_forward, model.layernorm_backward\n"
             "model.layernorm_forward = lambda x, w, b: (lambda out: (out[0], out[1] + (w,)))(fwd(x, w, b))\n"
             "model.layernorm_backward = lambda d, cache, w, dw, db: bwd(d, cache[:2], w, dw, db)")
    result = run_mpi(2, [sabotaged(tmp_path, PRELUDE + patch, "04_zero.verify")], timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.endswith("FAIL")]
    gathered = [line for line in failed if "stage 3" in line and "peak gathered" in line]
    copied = [line for line in failed if line.startswith("bf16 ") and "activation bytes" in line]
    assert gathered and copied and len(gathered) + len(copied) == len(failed), result.stdout


@pytest.mark.parametrize("n, flags, words", [
    (2, ["--zero-stage", 0], ["--zero-stage 0", "03_data_parallel"]),
    (1, ["--zero-stage", 4], ["--zero-stage", "0, 1, 2 or 3"]),
    (2, ["--tp", 2], ["--tp", "06_3d"]),
    (2, ["--batch-size", 6, "--grad-accum", 2], ["--batch-size 6", "multiple of 4"]),
])
def test_bad_input_exits_2_on_every_rank_with_one_message(tiny_data, tmp_path, n, flags, words):
    result = run_mpi(n, [TRAIN, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, *flags], timeout=60)
    assert_one_error(result, words)


def test_a_stage3_checkpoint_from_4_ranks_samples_on_one_core_and_resumes_exactly_on_2_ranks(tiny_data, tmp_path):
    common = ["--data-dir", tiny_data, *TINY]
    straight, sharded = tmp_path / "straight", tmp_path / "sharded"
    assert run(["01_single_core/train.py", *common, "--max-iters", 10, "--out-dir", straight]).returncode == 0
    first = run_mpi(4, [TRAIN, *common, "--zero-stage", 3, "--max-iters", 5, "--out-dir", sharded])
    assert first.returncode == 0, first.stderr
    sample = run(["01_single_core/sample.py", "--out-dir", sharded, "--max-new-tokens", 20, "--start", "ANNA"])
    assert sample.returncode == 0 and sample.stdout.startswith("ANNA"), sample.stderr
    result = run_mpi(2, [TRAIN, *common, "--zero-stage", 2, "--grad-accum", 2, "--max-iters", 10,
                         "--out-dir", sharded, "--resume"])
    assert result.returncode == 0, result.stderr
    assert_same_run(sharded, straight, 10)


def test_training_prints_the_measured_memory_beside_the_formula(tiny_data, tmp_path):
    result = run_mpi(2, [TRAIN, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, "--zero-stage", 3,
                         "--max-iters", 2])
    assert result.returncode == 0, result.stderr
    rows = {line.split("  ")[1].strip(): line.split()[-4:] for line in result.stdout.splitlines()
            if line.startswith("  ") and line.split()[-1] == "MiB" and line.split()[-3] == "MiB"}
    assert set(rows) == {"parameters", "gradients", "optimizer"}, result.stdout
    assert all(measured == formula for measured, _, formula, _ in rows.values()), rows
