"""01_single_core/bench.py: its FLOP count against the parameter layout, and a short run end to end.
No timing thresholds: performance targets belong in the benchmark's report, never in tests."""
import json
import math

from common.chapters import import_chapter
from common.model import gpt_layout
from conftest import run

BENCH = "01_single_core/bench.py"


def test_flops_per_step_counts_6_per_matmul_weight_per_token_plus_full_attention():
    bench = import_chapter("01_single_core.bench")
    cfg, batch_size = bench.CONFIGS["cpu"]
    # every 2-D tensor takes part in a matmul except wpe, which is only looked up (wte is also the LM head)
    n = sum(math.prod(shape) for name, shape in gpt_layout(cfg).shapes.items() if len(shape) == 2 and name != "wpe")
    tokens = batch_size * cfg.block_size
    attention = 12 * cfg.n_layer * cfg.block_size * cfg.n_embd
    assert bench.flops_per_step(cfg, batch_size) == (6 * n + attention) * tokens


def test_bench_runs_the_cpu_config_and_writes_positive_figures_to_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run([BENCH, "--config-name", "cpu", "--steps", 3, "--warmup", 1, "--no-torch",
                  "--peak-size", 512, "--json", out], timeout=60)
    assert result.returncode == 0, result.stderr
    r = json.loads(out.read_text())
    for key in ("ms_per_step", "tokens_per_s", "gflops", "sgemm_peak_gflops", "gflop_per_step", "peak_rss_mib",
                "rss_after_steps_mib"):
        assert r[key] > 0, f"{key} = {r[key]}"
    assert 0 < r["mfu"] < 1.5
    assert r["ms_min"] <= r["ms_per_step"] <= r["ms_max"]
    assert r["torch"] is None and "PyTorch      skipped (--no-torch)" in result.stdout


def test_bench_rejects_zero_steps_with_one_sentence_naming_the_flag():
    result = run([BENCH, "--steps", 0, "--no-torch"], timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: argument --steps: must be a positive integer, got 0"
