"""Activation memory and recomputation: the bytes the caches hold equal their formula exactly, recomputing
(selective or full) gives bitwise the gradients of keeping everything, on one core and in parallel layouts, and a
cache kept too long shows in the measurement and fails verify."""
import numpy as np
import pytest

from common.config import GPTConfig
from common.chapters import import_chapter
from common.memory import Transient, activation_bytes
from common.model import gpt_backward, gpt_forward, gpt_layout, init_params
from conftest import assert_one_error, read_run, run, run_mpi, sabotaged, verdict

MODES = ("none", "selective", "full")
CONFIGS = [(GPTConfig(2, 2, 16, 8, 11), 3), (GPTConfig(3, 3, 48, 32, 20), 5), (GPTConfig(4, 4, 128, 64, 65), 12)]


def one_step(gpt_cfg, rows, dtype, recompute):
    """The gradient of one forward and backward under `recompute`, and the peak bytes its caches held."""
    layout = gpt_layout(gpt_cfg)
    rng = np.random.default_rng(0)
    params = (init_params(gpt_cfg, 0, dtype) + rng.normal(0.0, 0.1, layout.size)).astype(dtype)
    x, y = rng.integers(0, gpt_cfg.vocab_size, (2, rows, gpt_cfg.block_size))
    held, grads = Transient(), np.zeros(layout.size, dtype)
    p = layout.views(params)
    _, _, cache = gpt_forward(p, x, y, gpt_cfg, recompute)
    held.hold("activations", cache)
    gpt_backward(cache, p, layout.views(grads))
    del cache
    assert held.held() == 0                             # nothing outlives the backward
    return grads, held.peak["activations"]


@pytest.mark.parametrize("gpt_cfg, rows", CONFIGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_caches_hold_exactly_the_formulas_bytes_in_every_mode(gpt_cfg, rows, dtype):
    e = np.dtype(dtype).itemsize
    for mode in MODES:
        _, measured = one_step(gpt_cfg, rows, dtype, mode)
        assert measured == activation_bytes(gpt_cfg, rows, gpt_cfg.n_layer, itemsize=e, recompute=mode), mode


@pytest.mark.parametrize("gpt_cfg, rows", CONFIGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_recomputed_gradients_are_bitwise_those_of_keeping_every_activation(gpt_cfg, rows, dtype):
    keep, _ = one_step(gpt_cfg, rows, dtype, "none")
    for mode in ("selective", "full"):
        assert np.array_equal(one_step(gpt_cfg, rows, dtype, mode)[0], keep), mode


def test_recomputation_saves_what_the_formula_says_on_the_default_model():
    gpt_cfg, rows = CONFIGS[-1]
    peaks = {mode: one_step(gpt_cfg, rows, np.float32, mode)[1] for mode in MODES}
    T, nh = gpt_cfg.block_size, gpt_cfg.n_head
    assert peaks["none"] - peaks["selective"] == rows * gpt_cfg.n_layer * nh * T * T * 4   # the probabilities
    assert peaks["none"] > 3 * peaks["full"]
    zb = import_chapter("05_pipeline.zero_bubble")
    assert zb.deferred_bytes(gpt_cfg, rows, 1, last=False) < activation_bytes(gpt_cfg, rows, 1, last=False)


def test_a_cache_kept_past_its_backward_raises_the_measured_peak():
    gpt_cfg, rows = CONFIGS[0]
    layout, held = gpt_layout(gpt_cfg), Transient()
    p = layout.views(init_params(gpt_cfg, 0, np.float64))
    x = np.zeros((rows, gpt_cfg.block_size), dtype=np.int64)
    leaked = []
    for _ in range(2):
        _, _, cache = gpt_forward(p, x, x, gpt_cfg)
        held.hold("activations", cache)
        gpt_backward(cache, p, layout.views(np.zeros(layout.size)))
        leaked.append(cache)                                   # the bug: someone keeps the cache
        del cache
    assert held.peak["activations"] == 2 * activation_bytes(gpt_cfg, rows, gpt_cfg.n_layer, itemsize=8)


# ----------------------------------------------------------------------------- in parallel layouts

TINY = ["--n-layer", 4, "--n-head", 4, "--n-embd", 16, "--block-size", 8, "--batch-size", 8, "--eval-iters", 2,
        "--eval-interval", 5, "--max-iters", 5]


@pytest.mark.parametrize("script, n, flags, modes", [
    ("01_single_core/train.py", 1, ["--dtype", "float64"], ("selective", "full")),
    ("02_tensor_parallel/train.py", 2, ["--sequence-parallel"], ("full",)),
    ("03_data_parallel/train.py", 2, ["--grad-accum", 2], ("selective",)),
    ("05_pipeline/train.py", 2, ["--schedule", "interleaved", "--virtual-stages", 2, "--microbatches", 2],
     ("selective", "full")),
    ("06_3d/train.py", 4, ["--tp", 2, "--pp", 2, "--sequence-parallel", "--schedule", "zb-h1", "--microbatches", 2],
     ("selective",)),
    ("06_3d/train.py", 4, ["--tp", 2, "--dp", 2, "--zero-stage", 3, "--microbatches", 2, "--dtype", "float64"],
     ("full",)),
], ids=["01", "02-tp2-sp", "03-dp2-accum2", "05-interleaved", "06-tp2-pp2-sp-zb-h1", "06-tp2-zero3"])
def test_a_run_that_recomputes_trains_bit_for_bit_as_one_that_keeps_everything(tiny_data, tmp_path, script, n,
                                                                                flags, modes):
    outs = {}
    for mode in ("none", *modes):
        outs[mode] = tmp_path / mode
        args = [script, "--data-dir", tiny_data, "--out-dir", outs[mode], *TINY, *flags, "--recompute", mode]
        result = run(args) if n == 1 else run_mpi(n, args)
        assert result.returncode == 0, result.stdout + result.stderr
        peak = result.stdout.strip().splitlines()[-1].split("activations: peak ")[1]
        held, formula = peak.split(" held by the caches, ")
        assert held == formula.removesuffix(" by the formula"), peak    # rank 0's caches held what they should
    want_losses, want_val, want = read_run(outs["none"])
    for mode in modes:
        losses, val, got = read_run(outs[mode])
        assert losses == want_losses and val == want_val, mode
        for key in want.files:
            if key != "meta":
                assert np.array_equal(got[key], want[key]), (mode, key)


def test_verify_fails_when_a_stage_keeps_its_caches_past_their_backward(tmp_path):
    # the leak: every cache a stage computes is kept, as a stray reference would keep it
    patch = ("pipe = import_chapter('05_pipeline.pipeline')\n"
             "kept, forward = [], pipe.stage_forward\n"
             "def stage_forward(*args, **kwargs):\n"
             "    out = forward(*args, **kwargs)\n"
             "    kept.append(out[2])\n"
             "    return out\n"
             "pipe.stage_forward = stage_forward\n")
    result = run_mpi(2, [sabotaged(tmp_path, patch, "05_pipeline.verify")])
    assert result.returncode == 1, result.stdout + result.stderr
    last = verdict(result)
    assert last.startswith("P=2: FAIL:") and "activation bytes per stage" in last, last
    failed = [line for line in result.stdout.splitlines() if line.endswith("FAIL")]
    assert failed and all("activation bytes" in line for line in failed), failed    # the gradients are right


@pytest.mark.parametrize("script, n, flags", [("05_pipeline/train.py", 2, []), ("06_3d/train.py", 2, ["--pp", 2])])
def test_full_recomputation_with_zero_bubble_is_refused_in_one_line(tiny_data, tmp_path, script, n, flags):
    result = run_mpi(n, [script, "--data-dir", tiny_data, "--out-dir", tmp_path, *TINY, *flags,
                         "--schedule", "zb-h1", "--recompute", "full"])
    assert_one_error(result, ["--recompute full", "--schedule zb-h1", "selective"])


def test_an_unknown_recompute_mode_is_refused_in_one_line(tiny_data, tmp_path):
    result = run(["01_single_core/train.py", "--data-dir", tiny_data, "--out-dir", tmp_path, "--recompute", "most"])
    assert_one_error(result, ["--recompute", "none", "selective", "full"])
