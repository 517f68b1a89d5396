"""Chapter 06: every tp x pp x dp layout (+ SP, ZeRO-1) equals single core, and checkpoints move between layouts."""
import json
import re

import pytest

from common.chapters import import_chapter
from conftest import assert_one_error, assert_same_run, run, run_mpi, sabotaged, verdict

VERIFY = "06_3d/verify.py"
TRAIN = "06_3d/train.py"
TINY = ["--n-layer", 4, "--n-head", 4, "--n-embd", 16, "--block-size", 8, "--batch-size", 8, "--eval-iters", 2,
        "--dtype", "float64", "--eval-interval", 5, "--microbatches", 2]
grid_lib = import_chapter("06_3d.grid")
sched = import_chapter("05_pipeline.schedules")


def test_tp_is_innermost_in_the_rank_map_then_cp_pp_and_dp():
    assert [tuple(grid_lib.coords(r, tp=2, pp=2)) for r in range(8)] == [
        (0, 0, 0, 0), (1, 0, 0, 0), (0, 0, 1, 0), (1, 0, 1, 0), (0, 0, 0, 1), (1, 0, 0, 1), (0, 0, 1, 1), (1, 0, 1, 1)]
    assert [grid_lib.coords(r, tp=2, cp=2, pp=2)._asdict() for r in (1, 2, 5, 15)] == [
        {"tp": 1, "cp": 0, "pp": 0, "dp": 0}, {"tp": 0, "cp": 1, "pp": 0, "dp": 0},
        {"tp": 1, "cp": 0, "pp": 1, "dp": 0}, {"tp": 1, "cp": 1, "pp": 1, "dp": 1}]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_verify_passes_for_every_layout_of_n_ranks_and_each_zero_stage_that_fits(n):
    result = run_mpi(n, [VERIFY], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(f"{n} ranks: PASS:")
    # a row's case: its layout, "sp" and the ZeRO stage, without its schedule and --recompute mode
    cases = {" ".join(w for w in line.split(":")[0].split() if w[0] == "(" or w == "sp" or re.fullmatch(r"z\d", w))
             for line in result.stdout.splitlines() if line.startswith("(")}
    if n == 8:
        layouts = {case.split()[0] for case in cases}
        assert {"(2,1,2,2)", "(1,1,2,4)", "(2,1,1,4)", "(4,1,2,1)", "(2,1,4,1)"} <= layouts
        # FSDP + TP: ZeRO-2/3 over dp with tensor parallelism (and SP), on the layouts without a pipeline
        assert {"(2,1,1,4) sp z2", "(2,1,1,4) sp z3", "(4,1,1,2) z3", "(4,1,1,2) sp z3"} <= cases
        assert not any(case.split()[0].split(",")[2] != "1" and case.endswith(("z2", "z3")) for case in cases)
    if n == 4:
        assert {"(2,1,1,2) z2", "(2,1,1,2) sp z3", "(1,1,1,4) z3"} <= cases
    # context parallelism: cp 2 and 4 (n >= 4), alone and with tp, pp, dp, SP and ZeRO, both splits
    runs = {" ".join(w for w in line.split(":")[0].split() if w not in (*sched.SCHEDULES, "full", "selective"))
            for line in result.stdout.splitlines() if line.startswith("(")}
    if n == 8:
        assert {"(1,2,1,4)", "(2,4,1,1)", "(2,2,2,1) contiguous sp", "(2,2,1,2) contiguous z2",
                "(1,2,4,1)"} <= runs, runs


@pytest.mark.parametrize("patch, args", [                       # and pp's tied embedding: the bug gallery's
    ("grid_lib.dp_lib.GradSync.finish = lambda self: None          # replicas never sum", ["--dp", 2]),
    ("grid_lib.tp_lib.sync_replicated_grads = lambda *a: None         # SP partial sums kept", ["--tp", 2]),
])
def test_verify_fails_when_one_axis_forgets_its_sum(tmp_path, patch, args):
    patch = "grid_lib = import_chapter('06_3d.grid')\n" + patch
    result = run_mpi(4, [sabotaged(tmp_path, patch, "06_3d.verify", args)], timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL:" in verdict(result)


@pytest.mark.parametrize("n, flags, words", [
    (4, ["--tp", 2, "--pp", 2, "--dp", 2], ["--tp 2 x --pp 2 x --dp 2 = 8", "started 4"]),
    (3, ["--tp", 3], ["--tp 3", "n_head=4"]),
    (4, ["--pp", 4, "--n-layer", 2], ["--n-layer 2", "--pp 4"]),
    (4, ["--dp", 4, "--batch-size", 4], ["--batch-size 4", "--dp 4", "multiple of 8"]),
    (4, ["--pp", 2, "--dp", 2, "--zero-stage", 2], ["--zero-stage 2", "--pp 2", "--zero-stage 1 with pipelines"]),
    (2, ["--dp", 2, "--zero-stage", 3, "--schedule", "zb-h1"], ["--zero-stage 3", "zb-h1", "--zero-stage 1 or 0"]),
    (4, ["--pp", 4, "--schedule", "interleaved", "--virtual-stages", 2], ["--n-layer 4", "8 chunks"]),
])
def test_bad_input_exits_2_on_every_rank_with_one_message(tiny_data, tmp_path, n, flags, words):
    result = run_mpi(n, [TRAIN, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, *flags], timeout=60)
    assert_one_error(result, words)


def test_a_checkpoint_moves_from_2x2x2_with_sp_and_zero1_to_4x1x1_and_to_one_core_exactly(tiny_data, tmp_path):
    common = ["--data-dir", tiny_data, *TINY]
    straight, grid, single = tmp_path / "straight", tmp_path / "grid", tmp_path / "single"
    assert run(["01_single_core/train.py", *common[:-2], "--max-iters", 10, "--out-dir", straight]).returncode == 0
    first = run_mpi(8, [TRAIN, *common, "--tp", 2, "--pp", 2, "--dp", 2, "--sequence-parallel", "--zero-stage", 1,
                        "--max-iters", 5, "--out-dir", grid], timeout=180)
    assert first.returncode == 0, first.stderr
    assert "world rank 5: tp 1, cp 0, pp 0, dp 1" in first.stdout
    ledger = json.loads((grid / "ledger.json").read_text())
    assert ledger["layout"] == {"tp": 2, "cp": 1, "pp": 2, "dp": 2}
    assert [(r["tp"], r["cp"], r["pp"], r["dp"]) for r in ledger["ranks"]] == \
        [grid_lib.coords(r, tp=2, pp=2) for r in range(8)]
    ranks = ledger["ranks"]
    assert all(r["comm"] == r["comm_formula"] for r in ranks), ranks
    single.mkdir()
    (single / "ckpt.npz").write_bytes((grid / "ckpt.npz").read_bytes())
    (single / "metrics.jsonl").write_bytes((grid / "metrics.jsonl").read_bytes())
    result = run_mpi(4, [TRAIN, *common, "--tp", 4, "--schedule", "afab", "--max-iters", 10, "--out-dir", grid,
                         "--resume"], timeout=180)
    assert result.returncode == 0, result.stderr
    assert_same_run(grid, straight, 10)
    result = run(["01_single_core/train.py", *common[:-2], "--max-iters", 10, "--out-dir", single, "--resume"])
    assert result.returncode == 0, result.stderr
    assert_same_run(single, straight, 10)


def test_the_replica_check_stops_a_grid_whose_data_parallel_sum_is_missing(tiny_data, tmp_path):
    patch = "grid_lib = import_chapter('06_3d.grid')\ngrid_lib.dp_lib.GradSync.finish = lambda self: None"
    args = ["--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, "--pp", 2, "--dp", 2, "--max-iters", 3]
    result = run_mpi(4, [sabotaged(tmp_path, patch, "06_3d.train", args)], timeout=120)
    assert result.returncode != 0
    assert "replicas differ after step 0" in result.stdout + result.stderr


@pytest.mark.parametrize("zero", [2, 3])
def test_tp_with_zero_2_or_3_over_dp_trains_exactly_as_one_core_and_its_ledger_is_the_formula(tiny_data, tmp_path,
                                                                                                zero):
    """The FSDP + TP layout (pp = 1), with sequence parallelism: every step, val loss and saved tensor equal
    single core's, and every rank's bytes per axis equal grid.ledger_formula."""
    common = ["--data-dir", tiny_data, *TINY]                    # TINY ends with --microbatches 2: not chapter 01's
    straight, grid = tmp_path / "straight", tmp_path / "grid"
    assert run(["01_single_core/train.py", *common[:-2], "--max-iters", 10, "--out-dir", straight]).returncode == 0
    result = run_mpi(4, [TRAIN, *common, "--tp", 2, "--dp", 2, "--sequence-parallel", "--zero-stage", zero,
                         "--max-iters", 10, "--out-dir", grid], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ZeRO-{zero}" in result.stdout
    ranks = json.loads((grid / "ledger.json").read_text())["ranks"]
    assert all(r["comm"] == r["comm_formula"] for r in ranks), ranks
    assert_same_run(grid, straight, 10)
