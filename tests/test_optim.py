"""AdamW, the learning-rate schedule and gradient clipping against textbook formulas; the flat-buffer Layout."""
import math

import numpy as np
import pytest

from common.config import GPTConfig, TrainConfig
from common.model import gpt_layout
from common.optim import AdamW, clip_grad_norm, decays, global_norm, lr_at
from common.params import Layout


def adamw_reference(p, grads, lrs, mask, beta1, beta2, weight_decay, eps):
    """torch.optim.AdamW's update, element by element as its documentation writes it."""
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        p = np.where(mask, p - lr * weight_decay * p, p)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v


def test_adamw_matches_pytorch_formulas_over_several_steps_with_a_mixed_decay_mask():
    rng = np.random.default_rng(0)
    n, steps = 40, 6
    mask = rng.random(n) < 0.5
    p0 = rng.normal(size=n)
    scale = np.where(np.arange(n) % 4 == 0, 1e-9, 1.0)              # tiny gradients, where eps matters
    grads = [rng.normal(size=n) * scale for _ in range(steps)]
    lrs = [1e-2 * (k + 1) for k in range(steps)]
    hyper = dict(beta1=0.9, beta2=0.95, weight_decay=0.1, eps=1e-8)

    opt = AdamW(mask, dtype=np.float64, **hyper)
    p = p0.copy()
    for g, lr in zip(grads, lrs):
        opt.step(p, g, lr)
    want_p, want_m, want_v = adamw_reference(p0, grads, lrs, mask, **hyper)
    assert opt.t == steps
    np.testing.assert_allclose(opt.m, want_m, rtol=1e-13)
    np.testing.assert_allclose(opt.v, want_v, rtol=1e-13)
    np.testing.assert_allclose(p, want_p, rtol=1e-13, atol=0)


def test_adamw_in_float32_keeps_float32_state_and_parameters():
    opt = AdamW(np.array([True, False, True]), 0.9, 0.99, 0.1, dtype=np.float32)
    p = np.ones(3, np.float32)
    opt.step(p, np.array([0.5, -1.0, 2.0], np.float32), 1e-3)
    assert p.dtype == opt.m.dtype == opt.v.dtype == np.float32
    assert np.all(p != 1.0)


def nanogpt_get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """nanoGPT train.py's get_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("step", [0, 1, 9, 10, 11, 55, 99, 100, 101, 5000])
def test_lr_at_matches_nanogpt_get_lr(step):
    cfg = TrainConfig(learning_rate=6e-4, min_lr=6e-5, warmup_iters=10, lr_decay_iters=100)
    want = nanogpt_get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)
    assert lr_at(step, cfg) == pytest.approx(want, rel=1e-14)


def test_lr_at_landmarks_warmup_peak_cosine_midpoint_and_floor():
    cfg = TrainConfig(learning_rate=6e-4, min_lr=6e-5, warmup_iters=10, lr_decay_iters=110)
    assert lr_at(0, cfg) == pytest.approx(cfg.learning_rate / 11)
    assert lr_at(10, cfg) == pytest.approx(cfg.learning_rate)
    assert lr_at(60, cfg) == pytest.approx((cfg.learning_rate + cfg.min_lr) / 2)
    assert lr_at(110, cfg) == pytest.approx(cfg.min_lr)
    assert lr_at(10_000, cfg) == cfg.min_lr


def test_clip_grad_norm_scales_a_large_gradient_to_max_norm_and_returns_the_norm_before():
    g0 = np.random.default_rng(0).normal(size=100) * 10
    g = g0.copy()
    assert clip_grad_norm(g, 1.0) == pytest.approx(np.linalg.norm(g0), rel=1e-12)
    assert np.linalg.norm(g) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(g * np.linalg.norm(g0), g0, rtol=1e-5)  # same direction


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_clip_grad_norm_leaves_a_gradient_alone_below_max_norm_or_when_disabled(max_norm):
    g0 = np.random.default_rng(0).normal(size=100) * (0.05 if max_norm else 10)
    g = g0.copy()
    assert clip_grad_norm(g, max_norm) == pytest.approx(np.linalg.norm(g0), rel=1e-12)
    np.testing.assert_array_equal(g, g0)


def test_clip_grad_norm_uses_a_given_global_norm_for_a_shard():
    g = np.ones(4)                                                   # local norm 2, global norm 8
    assert clip_grad_norm(g, 2.0, norm=8.0) == 8.0
    np.testing.assert_allclose(g, np.full(4, 0.25), rtol=1e-6)


SHAPES = [("a", (2, 3)), ("b", (4,)), ("c", (3, 1, 2)), ("d", (5, 5)), ("e", (1,))]


def test_layout_views_write_through_to_the_flat_buffer_and_back():
    layout = Layout(SHAPES)
    flat = np.zeros(layout.size)
    views = layout.views(flat)
    views["c"][1, 0, 1] = 7.0
    a, _ = layout.offsets["c"]
    assert flat[a + 3] == 7.0 and np.count_nonzero(flat) == 1
    flat[:] = np.arange(layout.size)
    for name, shape in SHAPES:
        assert views[name].shape == shape and np.shares_memory(views[name], flat)
        start, stop = layout.offsets[name]
        np.testing.assert_array_equal(views[name].ravel(), np.arange(start, stop))


@pytest.mark.parametrize("layout", [Layout(SHAPES), gpt_layout(GPTConfig(n_layer=2, n_embd=8, vocab_size=11))],
                         ids=["small", "gpt"])
def test_layout_offsets_are_contiguous_in_order_and_cover_the_buffer(layout):
    spans = [layout.offsets[name] for name in layout.shapes]
    assert spans[0][0] == 0 and spans[-1][1] == layout.size
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        assert stop == start
    for name, (start, stop) in layout.offsets.items():
        assert stop - start == math.prod(layout.shapes[name])


@pytest.mark.parametrize("layout", [Layout(SHAPES), gpt_layout(GPTConfig(n_layer=2, n_embd=8, vocab_size=11))],
                         ids=["small", "gpt"])
def test_decay_mask_marks_exactly_the_tensors_of_two_or_more_axes(layout):
    mask = layout.mask(decays)
    assert mask.dtype == bool and mask.shape == (layout.size,)
    for name, (start, stop) in layout.offsets.items():
        want = len(layout.shapes[name]) >= 2
        assert np.all(mask[start:stop] == want), name


def test_decay_mask_of_the_gpt_covers_embeddings_and_weights_but_no_bias_or_gain():
    layout = gpt_layout(GPTConfig(n_layer=1, n_embd=8, vocab_size=11))
    mask = layout.mask(decays)
    decayed = {name for name, (a, b) in layout.offsets.items() if mask[a:b].all()}
    assert decayed == {"wte", "wpe", "h.0.attn.c_attn.w", "h.0.attn.c_proj.w", "h.0.mlp.c_fc.w", "h.0.mlp.c_proj.w"}


def test_decay_mask_of_experts_covers_the_router_and_the_stacked_weights_but_not_the_stacked_biases():
    layout = gpt_layout(GPTConfig(n_layer=1, n_embd=8, vocab_size=11, n_experts=3))
    mask = layout.mask(decays)
    decayed = {name for name, (a, b) in layout.offsets.items() if mask[a:b].all()}
    assert not any(mask[a:b].any() for name, (a, b) in layout.offsets.items() if name not in decayed)
    assert decayed == {"wte", "wpe", "h.0.attn.c_attn.w", "h.0.attn.c_proj.w", "h.0.mlp.router.w",
                       "h.0.mlp.experts.c_fc.w", "h.0.mlp.experts.c_proj.w"}


def test_the_global_norm_of_a_gradient_split_by_ranges_counts_each_element_once():
    layout = Layout([("a", (3,)), ("b", (2, 2)), ("c", (5,))])
    g = np.random.default_rng(0).normal(size=layout.size)
    assert layout.ranges(lambda name: name != "b") == [(0, 3), (7, 12)]
    # a shard [2, 9) of the buffer: "a" cut to its last element, "c" to its first two, relative to the shard
    assert layout.ranges(lambda name: True, lo=2, hi=9) == [(0, 1), (1, 5), (5, 7)]
    halves = [layout.ranges(lambda name: True, 0, 6), layout.ranges(lambda name: True, 6, 12)]
    squares = [global_norm(g[lo:hi], ranges) ** 2 for (lo, hi), ranges in zip([(0, 6), (6, 12)], halves)]
    np.testing.assert_allclose(np.sqrt(sum(squares)), np.linalg.norm(g), rtol=1e-14)
