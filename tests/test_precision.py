"""Mixed precision (common/precision.py): what is stored in 16 bits, how far it lands from float64, that the
driver runs it bit for bit as the model does, loss scaling's rules, and how a run reports and survives them."""
from dataclasses import replace

import numpy as np
import pytest

from common import driver
from common.chapters import import_chapter
from common.config import GPTConfig, TrainConfig
from common.memory import Transient, activation_bytes
from common.model import gpt_backward, gpt_forward, gpt_layout, init_params
from common.optim import Diverged, LossScaler, decays, make_adamw
from common.metrics import read_metrics
from common.precision import autocast, mixed, storage, unit_roundoff, widths
from conftest import run, sabotaged

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11)
TRAIN = "01_single_core/train.py"
FLAGS = ["--n-layer", 2, "--n-head", 2, "--n-embd", 16, "--block-size", 8, "--batch-size", 4, "--eval-iters", 2,
         "--eval-interval", 10, "--log-interval", 1]


def batch(seed=0, rows=3):
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(0, TINY.vocab_size, (rows, TINY.block_size)) for _ in range(2))


def step(precision, recompute="none", fp32_grads=False, through_driver=False, gpt_cfg=TINY):
    """One forward and backward of TINY (or `gpt_cfg`) from the same float64 weights, stored in `precision`
    ("fp64": float64): (logits, loss, gradient, cache, params)."""
    dtype = np.float64 if precision == "fp64" else storage(TrainConfig(precision=precision))
    layout = gpt_layout(gpt_cfg)
    weights = init_params(gpt_cfg, 0, np.float64)
    weights += np.random.default_rng(1).normal(0.0, 0.1, weights.shape)
    params = weights.astype(dtype)
    grads = np.zeros(layout.size, np.float32 if fp32_grads else params.dtype)
    p, g = layout.views(params), layout.views(grads)
    x, y = batch()
    if through_driver:
        parts = driver.training_parts(mixed(driver.SINGLE, params.dtype), recompute)
        logits, loss, cache = driver.stage_forward(p, x, y, gpt_cfg, range(gpt_cfg.n_layer), parts=parts)
        driver.stage_backward(cache, p, g, 0.5)
    else:
        logits, loss, cache = gpt_forward(p, x, y, gpt_cfg, recompute)
        gpt_backward(cache, p, g, 0.5)
    return logits, loss, grads, cache, params


def relative(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_in_fp32_autocast_and_mixed_leave_the_model_as_it_is():
    mp = autocast(np.float32)
    assert mp(gpt_forward) is gpt_forward and mp(gpt_backward, grads=1) is gpt_backward
    assert mixed(driver.SINGLE, np.float32) is driver.SINGLE


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_16_bit_storage_lands_within_the_derived_tolerance_of_float64_and_really_rounds(precision):
    logits, loss, grads, cache, params = step(precision)
    want_logits, want_loss, want_grads, _, _ = step("fp64")
    dtype = storage(TrainConfig(precision=precision))
    assert params.dtype == dtype and grads.dtype == dtype and logits.dtype == dtype
    assert all(a.dtype == dtype for a in cache[1][0][0]), "a block's cache keeps 16-bit arrays"
    u, L = unit_roundoff(dtype), TINY.n_layer
    tol = (2 * L + 4 + 1) * u                      # one rounding per part each way, the gradient's own
    layout = gpt_layout(TINY)
    for name in layout.shapes:
        assert relative(layout.views(grads)[name], layout.views(want_grads)[name]) < tol, name
    assert relative(logits, want_logits) < (L + 2) * u
    assert abs(loss - want_loss) / want_loss < (L + 2) * u
    assert relative(grads, want_grads) > u / 16, "as close as float32: nothing was rounded to 16 bits"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_the_driver_in_mixed_precision_computes_bit_for_bit_what_the_model_does(precision, recompute):
    plain, driven = step(precision, recompute), step(precision, recompute, through_driver=True)
    assert plain[1] == driven[1]
    experts = replace(TINY, n_experts=3, top_k=2)
    assert np.array_equal(step(precision, recompute, gpt_cfg=experts)[2].view(np.uint16),
                          step(precision, recompute, through_driver=True, gpt_cfg=experts)[2].view(np.uint16))
    assert np.array_equal(plain[0].view(np.uint16), driven[0].view(np.uint16))
    assert np.array_equal(plain[2].view(np.uint16), driven[2].view(np.uint16))
    none = step(precision)
    if recompute == "full":                       # a block's forward run again rebuilds the same 16-bit cache
        assert np.array_equal(plain[2].view(np.uint16), none[2].view(np.uint16))
    elif recompute == "selective":                # the probabilities recomputed in float32, never rounded to 16 bits
        assert 0 < relative(plain[2], none[2]) < 2 * unit_roundoff(plain[2].dtype)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_16_bit_caches_hold_the_formulas_bytes_half_of_float32s(recompute):
    held = {}
    for precision in ("fp32", "bf16"):
        *_, cache, params = step(precision, recompute)
        t = Transient()
        t.hold("activations", cache)
        held[precision] = t.held("activations")
        assert held[precision] == activation_bytes(TINY, 3, TINY.n_layer, itemsize=params.itemsize,
                                                   recompute=recompute)
    assert held["bf16"] * 2 == held["fp32"]


def test_fp32_grads_keeps_the_gradient_in_float32_and_closer_to_float64():
    want = step("fp64")[2]
    sixteen, wide = step("bf16")[2], step("bf16", fp32_grads=True)[2]
    assert wide.dtype == np.float32
    assert relative(wide, want) < relative(sixteen, want)


def test_the_loss_scale_halves_and_skips_on_overflow_and_doubles_after_a_window_of_finite_steps():
    scaler = LossScaler(2.0 ** 16, window=3)
    assert scaler.update(False) is False and scaler.scale == 2.0 ** 15 and scaler.skipped == 1
    assert [scaler.update(True) for _ in range(2)] == [True, True] and scaler.scale == 2.0 ** 15
    assert scaler.update(True) and scaler.scale == 2.0 ** 16                     # the third clean step in a row
    assert scaler.update(True) and scaler.update(False) is False and scaler.scale == 2.0 ** 15
    assert [scaler.update(True) for _ in range(2)] == [True, True] and scaler.scale == 2.0 ** 15   # counts anew


def test_gradients_still_infinite_at_scale_one_or_under_a_fixed_scale_are_a_divergence():
    scaler = LossScaler(2.0, window=1000)
    assert scaler.update(False) is False and scaler.scale == 1.0
    with pytest.raises(Diverged, match="loss scale 1"):
        scaler.update(False)
    with pytest.raises(Diverged, match="loss scale 1024"):
        LossScaler(1024.0, dynamic=False).update(False)


def test_a_skipped_update_leaves_weights_master_and_adam_untouched_and_a_finite_one_rounds_from_the_master():
    layout = gpt_layout(TINY)
    master = init_params(TINY, 0, np.float32)
    opt = make_adamw(TrainConfig(precision="fp16"), layout.mask(decays), master.copy())
    params = master.astype(np.float16)
    before = [a.copy() for a in (params, opt.master, opt.m, opt.v)]
    grads = np.full(layout.size, 1e-3, np.float16)
    grads[7] = np.inf
    opt.update(params, opt.unscaled(grads), 1e-3, 1.0)
    assert opt.skipped and opt.t == 0 and opt.status() == {"loss_scale": 2.0 ** 15, "skipped": True}
    assert all(np.array_equal(a, b) for a, b in zip((params, opt.master, opt.m, opt.v), before))
    grads[7] = 0
    opt.update(params, opt.unscaled(grads), 1e-3, 1.0)
    assert not opt.skipped and opt.t == 1 and not np.array_equal(opt.master, before[1])
    assert np.array_equal(params, opt.master.astype(np.float16))


@pytest.mark.parametrize("flags, words", [
    (["--precision", "bf16", "--dtype", "float64"], ["--precision bf16", "float32 master", "--dtype"]),
    (["--precision", "bf16", "--loss-scale", "128"], ["--loss-scale 128", "--precision fp16"]),
    (["--fp32-grads"], ["--fp32-grads", "--precision bf16 or fp16"]),
])
def test_a_precision_the_run_cannot_take_is_refused_before_any_work(tiny_data, tmp_path, flags, words):
    result = run([TRAIN, "--data-dir", tiny_data, "--out-dir", tmp_path, *FLAGS, *flags])
    assert result.returncode == 2 and all(w in result.stderr for w in words), result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_zero_bubbles_deferred_weight_gradients_wait_in_16_bits_and_add_up_to_the_whole_backward():
    """05's B then W in bf16: every operand W waits with is 16-bit, and the gradients are the whole backward's
    but for that one rounding of W's operands (within 2u of it)."""
    zb = import_chapter("05_pipeline.zero_bubble")
    dtype = storage(TrainConfig(precision="bf16"))
    layout = gpt_layout(TINY)
    params = (init_params(TINY, 0, np.float64) + np.random.default_rng(1).normal(0, 0.1, layout.size)).astype(dtype)
    x, y = batch()
    grads = {}
    for deferred in (False, True):
        parts = driver.training_parts(mixed(zb.deferring(driver.SINGLE), dtype))
        g = np.zeros(layout.size, dtype)
        cache = driver.stage_forward(layout.views(params), x, y, TINY, range(TINY.n_layer), parts=parts)[2]
        queue = [] if deferred else None
        driver.stage_backward(cache, layout.views(params), layout.views(g), 1.0, weights=queue)
        if deferred:
            operands = [a for inputs in zb.queued_operands(queue) for a in inputs if isinstance(a, np.ndarray)]
            assert operands and all(a.dtype == dtype for a in operands if a.dtype.kind != "i")
            assert not g.any(), "B computed no weight gradient"
            driver.stage_weights(queue, layout.views(g), parts)
        grads[deferred] = g
    assert 0 < relative(grads[True], grads[False]) < 2 * unit_roundoff(dtype)


def test_an_overflowing_fp16_step_is_skipped_logged_and_training_goes_on(tiny_data, tmp_path):
    patch = ("import common.optim as P\ninit = P.LossScaler.__init__\n"    # start at 2^24: overflows at first
             "P.LossScaler.__init__ = lambda self, scale, window=1000, dynamic=True: init(self, 2.0 ** 24, window, "
             "dynamic)\n")
    script = sabotaged(tmp_path, patch, "01_single_core.train",
                       ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path / "run"), *map(str, FLAGS),
                        "--precision", "fp16", "--max-iters", "30", "--learning-rate", "1e-2"])
    result = run([script])
    assert result.returncode == 0, result.stderr
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert skipped and skipped == list(range(len(skipped))), skipped          # the first steps, until it fits
    assert rows[-1]["loss_scale"] == 2.0 ** 24 / 2 ** len(skipped)
    assert f"step {skipped[0]:>5}: gradients not finite, step skipped" in result.stdout
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3


def test_a_resumed_fp16_run_goes_on_at_the_loss_scale_it_had_reached_exactly_as_an_uninterrupted_one(tiny_data,
                                                                                                      tmp_path):
    patch = ("import common.optim as P\ninit = P.LossScaler.__init__\n"    # double every 3 clean steps
             "P.LossScaler.__init__ = lambda self, scale, window=1000, dynamic=True: init(self, scale, 3, dynamic)\n")
    runs = {}
    for name, legs in (("straight", [10]), ("resumed", [5, 10])):
        for i, steps in enumerate(legs):
            script = sabotaged(tmp_path, patch, "01_single_core.train",
                               ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path / name), *map(str, FLAGS),
                                "--precision", "fp16", "--max-iters", str(steps), "--eval-interval", "5",
                                *(["--resume"] if i else [])])
            result = run([script])
            assert result.returncode == 0, result.stderr
        runs[name] = [(r["step"], r["loss"], r["loss_scale"]) for r in read_metrics(tmp_path / name / "metrics.jsonl")
                      if "loss" in r]
    assert runs["resumed"] == runs["straight"]
    assert len({scale for _, _, scale in runs["straight"]}) >= 3         # it doubled on the way, twice or more


def test_gradients_that_stay_infinite_stop_the_run_as_diverged(tiny_data, tmp_path):
    result = run([TRAIN, "--data-dir", tiny_data, "--out-dir", tmp_path, *FLAGS, "--max-iters", 5,
                  "--precision", "fp16", "--loss-scale", "1e30"])
    assert result.returncode == 3, result.stdout + result.stderr
    assert "diverged at step 0: the gradients are not finite at loss scale 1e+30" in result.stderr


def test_widths_count_the_papers_bytes_per_parameter():
    assert sum(widths(TrainConfig(precision="bf16"))[:3]) == 16            # 2 + 2 + 12
    assert sum(widths(TrainConfig(precision="bf16", fp32_grads=True))[:3]) == 18
    assert sum(widths(TrainConfig())[:3]) == 16 and sum(widths(TrainConfig(dtype="float64"))[:3]) == 32
