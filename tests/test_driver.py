"""The model driver (common/driver.py) against chapter 01's plain model: with no seam used it computes bit for bit
what gpt_forward/gpt_backward compute, sliced into stages too; each seam keeps its contract."""
import contextlib

import numpy as np
import pytest

import common.driver as driver
import common.model as model
from common.config import GPTConfig
from common.memory import Transient, activation_bytes

CFG = GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=11)
EXPERTS = GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=11, n_experts=4, top_k=2,
                    capacity_factor=1.0)


def batch(cfg, dtype, seed=0):
    layout = model.gpt_layout(cfg)
    rng = np.random.default_rng(seed)
    params = (model.init_params(cfg, 0, dtype) + rng.normal(0.0, 0.1, layout.size)).astype(dtype)
    x, y = rng.integers(0, cfg.vocab_size, (2, 4, cfg.block_size))
    return layout, params, x, y


def plain(cfg, layout, params, x, y, recompute="none", dloss=1.0):
    grads = np.zeros_like(params)
    logits, loss, cache = model.gpt_forward(layout.views(params), x, y, cfg, recompute)
    model.gpt_backward(cache, layout.views(params), layout.views(grads), dloss)
    return logits, loss, grads


@pytest.mark.parametrize("cfg", [CFG, EXPERTS], ids=["dense", "experts"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_the_driver_with_no_seam_used_computes_bit_for_bit_what_the_plain_model_computes(cfg, dtype, recompute):
    layout, params, x, y = batch(cfg, dtype)
    want_logits, want_loss, want_grads = plain(cfg, layout, params, x, y, recompute, dloss=0.5)
    grads = np.zeros_like(params)
    parts = driver.training_parts(driver.SINGLE, recompute)
    logits, loss, cache = driver.gpt_forward(layout.views(params), x, y, cfg, parts=parts)
    driver.gpt_backward(cache, layout.views(params), layout.views(grads), dloss=0.5)
    assert loss == want_loss and np.array_equal(logits, want_logits)
    assert np.array_equal(grads, want_grads) and grads.any()


@pytest.mark.parametrize("cfg", [CFG, EXPERTS], ids=["dense", "experts"])
def test_the_model_sliced_into_stages_computes_bit_for_bit_what_it_computes_whole(cfg):
    """Experts: the first stage's blocks weight their balance terms with the loss's seed, which only the last
    stage's backward starts from, so stage_backward is given it (dloss)."""
    layout, params, x, y = batch(cfg, np.float64)
    want_logits, want_loss, want_grads = plain(cfg, layout, params, x, y, dloss=0.5)
    p, grads = layout.views(params), np.zeros_like(params)
    g = layout.views(grads)
    act, _, first = driver.stage_forward(p, x, None, cfg, range(1), first=True, last=False)
    logits, loss, last = driver.stage_forward(p, act, y, cfg, range(1, 3), first=False, last=True)
    dact = driver.stage_backward(last, p, g, 0.5)
    assert driver.stage_backward(first, p, g, dact, dloss=0.5) is None    # the first stage has no input gradient
    assert loss == want_loss and np.array_equal(logits, want_logits) and np.array_equal(grads, want_grads)
    if cfg.n_experts:                   # without the seed, the first stage's router learns the wrong balance
        wrong = np.zeros_like(grads)
        _, _, first = driver.stage_forward(p, x, None, cfg, range(1), first=True, last=False)
        driver.stage_backward(first, p, layout.views(wrong), dact, dloss=1.0)
        assert not np.allclose(layout.views(wrong)["h.0.mlp.router.w"], g["h.0.mlp.router.w"])


def test_grads_ready_names_each_part_once_its_gradients_and_all_after_it_are_final():
    layout, params, x, y = batch(CFG, np.float64)
    _, _, want = plain(CFG, layout, params, x, y)
    grads, seen = np.zeros_like(params), []

    def grads_ready(name):
        start = layout.offsets[name][0]
        assert np.array_equal(grads[start:], want[start:]), name
        seen.append(name)

    _, _, cache = driver.gpt_forward(layout.views(params), x, y, CFG)
    driver.gpt_backward(cache, layout.views(params), layout.views(grads), grads_ready=grads_ready)
    assert seen == ["ln_f.w", "h.2.ln_1.w", "h.1.ln_1.w", "h.0.ln_1.w", "wte"]


def test_the_model_reads_each_part_only_inside_its_hook_and_gives_the_same_gradients():
    """The `using` hook, as ZeRO-3 uses it: p and g hold a part's tensors only between its enter and exit. Any
    read outside `modules(cfg)` would raise KeyError here."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=4, vocab_size=7)
    layout, params, x, y = batch(cfg, np.float64)
    parts = driver.modules(cfg)
    assert {n for names in parts.values() for n in names} == set(layout.shapes)
    _, want_loss, want_grads = plain(cfg, layout, params, x, y)
    full, p, g, order, grads = layout.views(params), {}, {}, [], np.zeros_like(params)

    @contextlib.contextmanager
    def using(part):
        order.append(part)
        p.update({n: full[n] for n in parts[part]})
        g.update({n: layout.views(grads)[n] for n in parts[part]})
        yield
        p.clear()
        g.clear()

    _, loss, cache = driver.gpt_forward(p, x, y, cfg, using=using)
    driver.gpt_backward(cache, p, g, using=using)
    assert order == ["embedding", "h.0", "h.1", "head", "head", "h.1", "h.0", "embedding"]
    assert loss == want_loss and np.array_equal(grads, want_grads)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_the_driver_holds_what_the_plain_models_cache_holds(recompute):
    layout, params, x, y = batch(CFG, np.float32)
    held, plain_held = Transient(), Transient()
    _, _, cache = driver.gpt_forward(layout.views(params), x, y, CFG,
                                     parts=driver.training_parts(driver.SINGLE, recompute, held))
    plain_held.hold("activations", model.gpt_forward(layout.views(params), x, y, CFG, recompute)[2])
    want = activation_bytes(CFG, 4, CFG.n_layer, itemsize=4, recompute=recompute)
    assert held.peak["activations"] == plain_held.peak["activations"] == want
