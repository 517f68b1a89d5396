"""Chapter 03: data parallelism in every mode, with gradient accumulation, equals single core; drift is caught."""
import json

import pytest

from common.network import PRESETS, collective_time
from conftest import assert_one_error, assert_same_run, run, run_mpi, sabotaged, verdict

VERIFY = "03_data_parallel/verify.py"
TRAIN = "03_data_parallel/train.py"
TINY = ["--n-layer", 2, "--n-head", 2, "--n-embd", 16, "--block-size", 8, "--batch-size", 8, "--eval-iters", 2,
        "--dtype", "float64", "--eval-interval", 5]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_verify_passes_for_every_mode_and_accumulation_at_dp(dp):
    result = run_mpi(dp, [VERIFY], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(f"dp={dp}: PASS:")


DP_LIB = "dp_lib = import_chapter('03_data_parallel.data_parallel')\n"


def test_verify_fails_when_one_bucket_is_not_all_reduced(tmp_path):
    patch = DP_LIB + "dp_lib.buckets = (lambda f: lambda *a: f(*a)[1:])(dp_lib.buckets)   # the last layers'"
    result = run_mpi(2, [sabotaged(tmp_path, patch, "03_data_parallel.verify")], timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL:" in verdict(result)


def test_verify_names_the_tensor_whose_gradient_was_not_all_reduced(tmp_path):
    patch = DP_LIB + ("f = dp_lib.GradSync.finish\n"
                      "def finish(self):                     # bucketed: one tensor keeps this rank's own gradient\n"
                      "    g = self.layout.views(self.grads)['h.0.mlp.c_fc.w']\n"
                      "    mine = g.copy() if self.mode == 'bucketed' else None\n"
                      "    f(self)\n"
                      "    if mine is not None:\n"
                      "        g[...] = mine\n"
                      "dp_lib.GradSync.finish = finish")
    result = run_mpi(2, [sabotaged(tmp_path, patch, "03_data_parallel.verify")], timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.endswith("FAIL")]
    assert failed and all(line.removeprefix("bf16 ").split()[0] == "bucketed" for line in failed), result.stdout
    assert all("worst h.0.mlp.c_fc.w" in line for line in failed if "all parameters" in line), result.stdout
    first = verdict(result).split("exceed 1e-10: ")[1].split(", ")[0]   # x1 or x2 may be the worst: both are wrong
    assert first.removeprefix("bf16 ").startswith("bucketed x") and first.endswith(": h.0.mlp.c_fc.w"), verdict(result)
    # the bf16 run's tolerance, derived from bf16's unit roundoff, is no excuse: it fails on the same tensor
    assert any(line.startswith("bf16 bucketed") and "first gradient" in line and "worst h.0.mlp.c_fc.w" in line
               for line in failed), result.stdout


def test_the_replica_check_stops_training_whose_gradients_are_not_synchronised(tiny_data, tmp_path):
    patch = DP_LIB + "dp_lib.GradSync.finish = lambda self: None                  # no all-reduce at all"
    args = ["--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, "--max-iters", 3]
    result = run_mpi(2, [sabotaged(tmp_path, patch, "03_data_parallel.train", args)], timeout=60)
    assert result.returncode != 0
    assert "replicas differ after step 0" in result.stdout + result.stderr


@pytest.mark.parametrize("n, flags, words", [
    (2, ["--batch-size", 6, "--grad-accum", 2], ["--batch-size 6", "--grad-accum 2", "multiple of 4"]),
    (2, ["--dp", 4], ["--dp 4", "2 ranks"]),
    (1, ["--dp-mode", "ring"], ["--dp-mode", "ring"]),
])
def test_bad_input_exits_2_on_every_rank_with_one_message(tiny_data, tmp_path, n, flags, words):
    result = run_mpi(n, [TRAIN, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, *flags], timeout=60)
    assert_one_error(result, words)


@pytest.mark.parametrize("mode", ["naive", "overlapped"])
def test_training_on_two_ranks_with_accumulation_reproduces_single_core_losses(tiny_data, tmp_path, mode):
    common = ["--data-dir", tiny_data, *TINY, "--max-iters", 8]
    assert run(["01_single_core/train.py", *common, "--out-dir", tmp_path / "single"]).returncode == 0
    result = run_mpi(2, [TRAIN, *common, "--out-dir", tmp_path / "dp", "--grad-accum", 2, "--dp-mode", mode])
    assert result.returncode == 0, result.stderr
    assert_same_run(tmp_path / "dp", tmp_path / "single", 8)


@pytest.mark.parametrize("mode, kind", [("bucketed", "allreduce"), ("overlapped", "iallreduce")])
def test_the_timeline_shows_overlapped_buckets_starting_inside_the_backward_and_bucketed_ones_after_it(
        tiny_data, tmp_path, mode, kind):
    args = ["--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, "--max-iters", 2, "--dp-mode", mode,
            "--bucket-mb", 0.01, "--network", "ethernet-10g"]
    result = run_mpi(2, [TRAIN, *args], timeout=60)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "timeline.json").read_text())
    buckets, parts = record["buckets"], ["embedding", "h.0", "h.1", "head"]
    assert len(buckets) >= 4 and len(record["ranks"]) == 2
    for rank in record["ranks"]:
        trace = rank["trace"]
        assert [(op, name) for op, name, _, _ in trace if op in ("forward", "backward")] == \
            [("forward", p) for p in parts] + [("backward", p) for p in reversed(parts)], trace
        sums = [(op, name, start, end) for op, name, start, end in trace if op not in ("forward", "backward")]
        assert [(op, name) for op, name, _, _ in sums] == [(kind, i) for i in range(len(buckets))], sums
        backward_end = max(end for op, _, _, end in trace if op == "backward")
        started = [name for _, name, start, _ in sums if start < backward_end]
        assert bool(started) == (mode == "overlapped"), trace     # overlapped: h.1's before h.0's backward starts
        for (_, name, start, end), (lo, hi) in zip(sums, buckets):        # at least the modelled link's time
            wire = collective_time(kind, (hi - lo) * record["itemsize"], 2, PRESETS["ethernet-10g"])
            assert end - start >= wire, (name, start, end, wire)
        assert all(a[3] < b[3] for a, b in zip(sums, sums[1:])), sums      # one link: each arrives after the last
