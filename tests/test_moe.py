"""The mixture of experts (common/moe.py): its routing rules, its hand-written backward against finite
differences (and shown to fail when a piece of it is dropped), its caches' bytes, and a batch routed the same
however it is split, which the parallel chapters' exactness rests on."""
import numpy as np
import pytest

import common.model
from common.chapters import import_chapter
from common.config import GPTConfig
from common.memory import Transient, activation_bytes
from common.model import gpt_backward, gpt_forward, gpt_layout, init_params, objective, routing
from common.moe import capacity, moe_backward, moe_forward, route

verify = import_chapter("01_single_core.verify")

# 5 tokens, 2 of 3 experts each, a capacity of ceil(5 2 / 3) = 4 assignments: the gradcheck's batch drops some
EXPERTS = GPTConfig(n_layer=2, n_head=1, n_embd=4, block_size=5, vocab_size=11, n_experts=3, top_k=2,
                    capacity_factor=1.0, aux_loss_coef=0.1)


def logits_router(logits):
    """(h, wr) whose router logits are `logits` (B,T,E): h holds them and wr is the identity."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits, np.eye(logits.shape[-1])


def test_the_k_largest_probabilities_are_chosen_with_ties_to_the_lower_expert():
    cfg = GPTConfig(n_embd=4, n_head=1, n_experts=4, top_k=2, capacity_factor=4.0)
    h, wr = logits_router([[[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [3.0, 0.0, 0.0, 2.0]]])
    _, dispatch, _, routing_ = route(h, wr, cfg)
    chosen = sorted(zip(dispatch.tokens.tolist(), dispatch.experts.tolist()))
    assert chosen == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 3)]
    assert routing_.chosen.tolist() == routing_.kept.tolist() == [2, 2, 1, 1]


def test_every_first_choice_is_served_before_any_second_choice_and_a_token_over_capacity_is_dropped():
    # capacity ceil(0.5 x 2 tokens x 2 / 2 experts) = 1. Token 0 prefers expert 0, token 1 expert 1: both first
    # choices are served, so neither second choice is (served in token order, token 0's second would have won)
    cfg = GPTConfig(n_embd=2, n_head=1, block_size=2, n_experts=2, top_k=2, capacity_factor=0.5)
    h, wr = logits_router([[[2.0, 1.0], [1.0, 2.0]]])
    assert capacity(2, cfg) == 1
    _, dispatch, _, routing_ = route(h, wr, cfg)
    assert list(zip(dispatch.tokens.tolist(), dispatch.experts.tolist())) == [(0, 0), (1, 1)]
    assert routing_.chosen.tolist() == [2, 2] and routing_.kept.tolist() == [1, 1]


def test_a_token_whose_every_assignment_is_dropped_leaves_the_mixture_as_zero_so_the_residual_carries_it():
    cfg = GPTConfig(n_embd=2, n_head=1, block_size=3, n_experts=2, top_k=1, capacity_factor=0.5)
    h, _ = logits_router([[[2.0, 1.0], [3.0, 1.0], [1.0, 2.0]]])             # two tokens want expert 0, room for 1
    rng = np.random.default_rng(0)
    p = {"mlp.router.w": np.eye(2), "mlp.experts.c_fc.w": rng.normal(size=(2, 2, 8)),
         "mlp.experts.c_fc.b": rng.normal(size=(2, 8)), "mlp.experts.c_proj.w": rng.normal(size=(2, 8, 2)),
         "mlp.experts.c_proj.b": rng.normal(size=(2, 2))}
    out, cache = moe_forward(h, p, cfg)
    assert cache.routing.kept.tolist() == [1, 1]
    assert np.all(out[0, 1] == 0) and np.all(out[0, 0] != 0) and np.all(out[0, 2] != 0)


def test_the_balance_loss_is_one_for_a_uniform_router_and_e_sum_f_p_otherwise():
    cfg = GPTConfig(n_embd=3, n_head=1, block_size=4, n_experts=3, top_k=1, capacity_factor=3.0)
    rng = np.random.default_rng(1)
    _, _, _, uniform = route(rng.normal(size=(2, 4, 3)), np.zeros((3, 3)), cfg)
    assert uniform.aux == pytest.approx(1.0, rel=1e-14)
    logits = rng.normal(size=(1, 4, 3))
    probs, _, chosen, routing_ = route(*logits_router(logits), cfg)
    f = np.bincount(np.argmax(logits[0], axis=-1), minlength=3) / 4
    assert chosen[0].tolist() == (4 * f).astype(int).tolist()
    assert routing_.aux == pytest.approx(3 * np.sum(f * probs.mean(axis=0)), rel=1e-14)


def test_a_batch_routes_as_its_sequences_do_one_by_one_so_any_split_of_it_computes_the_same():
    cfg = EXPERTS
    C, rng = cfg.n_embd, np.random.default_rng(2)
    p = {name: rng.normal(0.0, 0.5, shape) for name, shape in common.model.block_shapes(C, cfg.n_experts)}
    h, dout = rng.normal(size=(2, 3, cfg.block_size, C))
    g_whole = {name: np.zeros_like(w) for name, w in p.items()}
    out, cache = moe_forward(h, p, cfg)
    dh = moe_backward(dout, cache, p, g_whole, dloss=0.5)
    g_split = {name: np.zeros_like(w) for name, w in p.items()}
    for b in range(3):                   # each sequence alone, its loss a third of the batch's
        out_b, cache_b = moe_forward(h[b:b + 1], p, cfg)
        np.testing.assert_allclose(out_b[0], out[b], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(moe_backward(dout[b:b + 1], cache_b, p, g_split, dloss=0.5 / 3)[0], dh[b],
                                   rtol=1e-12, atol=1e-15)
    assert cache.routing.kept.sum() < cache.routing.chosen.sum()               # some assignments were dropped
    for name in g_whole:
        np.testing.assert_allclose(g_split[name], g_whole[name], rtol=1e-12, atol=1e-15, err_msg=name)


def test_the_gradcheck_of_a_model_of_experts_passes_with_assignments_dropped():
    report = verify.gradcheck(EXPERTS, verbose=False)
    assert all(ok for _, ok in report.rows) and len(report.rows) == len(gpt_layout(EXPERTS).shapes)
    # the gradcheck's batch and weights, as it draws them: some assignments were over capacity
    rng = np.random.default_rng(0)
    params = init_params(EXPERTS, 0, np.float64) + rng.normal(0.0, 0.1, gpt_layout(EXPERTS).size)
    idx = rng.integers(0, EXPERTS.vocab_size, (2, EXPERTS.block_size))
    idx[1, :3] = idx[0, 0]
    _, _, cache = gpt_forward(gpt_layout(EXPERTS).views(params), idx, rng.integers(0, 11, idx.shape), EXPERTS)
    assert any(r.kept.sum() < r.chosen.sum() for r in map(routing, cache[1]))


@pytest.mark.parametrize("bug, broken", [
    ("the balance loss's gradient left out", {"daux": 0.0}),
    ("the gates' gradient left out (the router learns nothing from the loss)", {"ys": "zeros"}),
])
def test_the_gradcheck_fails_when_a_piece_of_the_experts_backward_is_missing(monkeypatch, bug, broken):
    real = common.model.moe_forward

    def sabotaged(h, p, gpt_cfg):
        out, cache = real(h, p, gpt_cfg)
        return out, cache._replace(**{k: np.zeros_like(getattr(cache, k)) if v == "zeros" else v
                                      for k, v in broken.items()})

    monkeypatch.setattr(common.model, "moe_forward", sabotaged)
    report = verify.gradcheck(EXPERTS, verbose=False)
    failed = {name for name, ok in report.rows if not ok}
    assert "h.0.mlp.router.w" in failed and "h.1.mlp.router.w" in failed, bug


@pytest.mark.parametrize("dtype", [np.float64, np.float32, "bfloat16"])
def test_the_caches_of_experts_hold_exactly_the_formulas_bytes_in_every_mode(dtype):
    cfg, rows = EXPERTS, 3
    layout = gpt_layout(cfg)
    rng = np.random.default_rng(3)
    params = init_params(cfg, 0, np.float64) + rng.normal(0.0, 0.1, layout.size)
    if dtype == "bfloat16":
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
    p = layout.views(params.astype(dtype))
    x, y = rng.integers(0, cfg.vocab_size, (2, rows, cfg.block_size))
    for mode in ("none", "selective", "full"):
        held = Transient()
        _, _, cache = gpt_forward(p, x, y, cfg, mode)
        held.hold("activations", cache)
        dispatched = sum(int(r.kept.sum()) for r in map(routing, cache[1]))
        e = np.dtype(dtype).itemsize
        assert held.held() == activation_bytes(cfg, rows, cfg.n_layer, itemsize=e, recompute=mode,
                                               dispatched=dispatched), mode
        assert held.held() <= activation_bytes(cfg, rows, cfg.n_layer, itemsize=e, recompute=mode), mode


def test_recomputed_gradients_of_experts_are_those_of_keeping_every_activation():
    cfg, layout = EXPERTS, gpt_layout(EXPERTS)
    rng = np.random.default_rng(4)
    params = init_params(cfg, 0, np.float64) + rng.normal(0.0, 0.1, layout.size)
    x, y = rng.integers(0, cfg.vocab_size, (2, 3, cfg.block_size))
    grads = {}
    for mode in ("none", "selective", "full"):
        g = np.zeros(layout.size)
        _, loss, cache = gpt_forward(layout.views(params), x, y, cfg, mode)
        assert objective(loss, cache, cfg) > loss                                 # the balance terms are there
        gpt_backward(cache, layout.views(params), layout.views(g), dloss=0.5)
        grads[mode] = g
    assert np.array_equal(grads["full"], grads["none"])
    np.testing.assert_allclose(grads["selective"], grads["none"], rtol=1e-12, atol=1e-15)
