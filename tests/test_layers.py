"""Every layer's hand-written backward against float64 central finite differences, then the whole model."""
import numpy as np
import pytest

import common.model as model
from common.chapters import import_chapter
from common.config import GPTConfig
from conftest import run

EPS, TOL = 1e-6, 1e-6
verify = import_chapter("01_single_core.verify")


def numeric_grad(loss, x):
    """d loss() / d x by central differences, nudging each element of x in place."""
    flat, grad = x.reshape(-1), np.zeros(x.size)
    assert np.shares_memory(flat, x), "x must be contiguous so nudges reach the layer"
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + EPS
        up = loss()
        flat[i] = saved - EPS
        down = loss()
        flat[i] = saved
        grad[i] = (up - down) / (2 * EPS)
    return grad.reshape(x.shape)


def rel_error(analytic, numeric):
    assert analytic.shape == numeric.shape
    return np.abs(analytic - numeric).max() / np.abs(numeric).max()


def assert_grads(pairs):
    """pairs: {name: (analytic, numeric)}; fails naming every tensor whose relative error exceeds TOL."""
    errors = {name: rel_error(a, n) for name, (a, n) in pairs.items()}
    assert all(e < TOL for e in errors.values()), errors


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_embedding_backward_matches_finite_differences_and_adds_rows_of_repeated_tokens(rng):
    V, T, C = 7, 6, 4
    wte, wpe = rng.normal(size=(V, C)), rng.normal(size=(T, C))
    idx = np.array([[3, 1, 3, 3, 0], [1, 5, 5, 2, 3]])               # T=5 < block 6; token 3 four times
    R = rng.normal(size=(2, 5, C))
    loss = lambda: (model.embedding_forward(idx, wte, wpe)[0] * R).sum()
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    _, cache = model.embedding_forward(idx, wte, wpe)
    model.embedding_backward(R, cache, dwte, dwpe)
    assert_grads({"wte": (dwte, numeric_grad(loss, wte)), "wpe": (dwpe, numeric_grad(loss, wpe))})
    assert not dwpe[5].any() and not dwte[[4, 6]].any()              # unused positions and tokens get nothing


def test_layernorm_backward_matches_finite_differences_for_x_w_b(rng):
    x = rng.normal(1.0, 2.0, size=(2, 3, 8))
    w, b = rng.normal(size=8), rng.normal(size=8)
    R = rng.normal(size=x.shape)
    loss = lambda: (model.layernorm_forward(x, w, b)[0] * R).sum()
    dw, db = np.zeros_like(w), np.zeros_like(b)
    _, cache = model.layernorm_forward(x, w, b)
    dx = model.layernorm_backward(R, cache, w, dw, db)
    assert_grads({"x": (dx, numeric_grad(loss, x)), "w": (dw, numeric_grad(loss, w)),
                  "b": (db, numeric_grad(loss, b))})


def test_linear_backward_matches_finite_differences_for_x_w_b(rng):
    x, w, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(4, 5)), rng.normal(size=5)
    R = rng.normal(size=(2, 3, 5))
    loss = lambda: (model.linear_forward(x, w, b)[0] * R).sum()
    dw, db = np.zeros_like(w), np.zeros_like(b)
    _, cache = model.linear_forward(x, w, b)
    dx = model.linear_backward(R, cache, w, dw, db)
    assert_grads({"x": (dx, numeric_grad(loss, x)), "w": (dw, numeric_grad(loss, w)),
                  "b": (db, numeric_grad(loss, b))})


def test_attention_backward_matches_finite_differences_with_two_heads(rng):
    n_head, hs = 2, 3
    qkv = rng.normal(size=(2, 5, 3 * n_head * hs))
    R = rng.normal(size=(2, 5, n_head * hs))
    loss = lambda: (model.attention_forward(qkv, n_head)[0] * R).sum()
    _, cache = model.attention_forward(qkv, n_head)
    dqkv = model.attention_backward(R, cache)
    assert_grads({"qkv": (dqkv, numeric_grad(loss, qkv))})


@pytest.mark.parametrize("t", [0, 2, 4])
def test_attention_output_at_t_ignores_every_later_position(rng, t):
    qkv = rng.normal(size=(2, 6, 3 * 2 * 3))
    before = model.attention_forward(qkv.copy(), 2)[0]
    qkv[:, t + 1:] = rng.normal(size=qkv[:, t + 1:].shape)           # new queries, keys and values after t
    after = model.attention_forward(qkv, 2)[0]
    np.testing.assert_array_equal(after[:, :t + 1], before[:, :t + 1])
    assert not np.allclose(after[:, t + 1:], before[:, t + 1:])      # the change did reach later positions


def test_gelu_backward_matches_finite_differences(rng):
    x = rng.normal(0.0, 2.0, size=(2, 3, 4))
    R = rng.normal(size=x.shape)
    loss = lambda: (model.gelu_forward(x)[0] * R).sum()
    _, cache = model.gelu_forward(x)
    assert_grads({"x": (model.gelu_backward(R, cache), numeric_grad(loss, x))})


def test_lm_head_backward_matches_finite_differences_for_x_and_tied_wte(rng):
    x, wte = rng.normal(size=(2, 3, 4)), rng.normal(size=(7, 4))
    R = rng.normal(size=(2, 3, 7))
    loss = lambda: (model.lm_head_forward(x, wte)[0] * R).sum()
    dwte = np.zeros_like(wte)
    _, cache = model.lm_head_forward(x, wte)
    dx = model.lm_head_backward(R, cache, wte, dwte)
    assert_grads({"x": (dx, numeric_grad(loss, x)), "wte": (dwte, numeric_grad(loss, wte))})


def test_cross_entropy_backward_matches_finite_differences(rng):
    logits, targets = rng.normal(0.0, 3.0, size=(2, 3, 7)), rng.integers(0, 7, size=(2, 3))
    r = rng.normal()                                                 # a scalar objective r * loss
    loss = lambda: r * model.cross_entropy_forward(logits, targets)[0]
    _, cache = model.cross_entropy_forward(logits, targets)
    assert_grads({"logits": (model.cross_entropy_backward(r, cache), numeric_grad(loss, logits))})


def backward_into(rng, layer, grads):
    """Run one layer's forward and backward on fresh random inputs, accumulating into `grads`."""
    x = rng.normal(size=(2, 3, 4))
    if layer == "embedding":
        idx = np.array([[1, 1, 2], [0, 1, 3]])
        out, cache = model.embedding_forward(idx, rng.normal(size=(5, 4)), rng.normal(size=(3, 4)))
        model.embedding_backward(rng.normal(size=out.shape), cache, grads["wte"], grads["wpe"])
    elif layer == "layernorm":
        w = rng.normal(size=4)
        out, cache = model.layernorm_forward(x, w, rng.normal(size=4))
        model.layernorm_backward(rng.normal(size=out.shape), cache, w, grads["w"], grads["b"])
    elif layer == "linear":
        w = rng.normal(size=(4, 5))
        out, cache = model.linear_forward(x, w, rng.normal(size=5))
        model.linear_backward(rng.normal(size=out.shape), cache, w, grads["w"], grads["b"])
    elif layer == "lm_head":
        wte = rng.normal(size=(5, 4))
        out, cache = model.lm_head_forward(x, wte)
        model.lm_head_backward(rng.normal(size=out.shape), cache, wte, grads["wte"])


@pytest.mark.parametrize("layer, shapes", [
    ("embedding", {"wte": (5, 4), "wpe": (3, 4)}),
    ("layernorm", {"w": (4,), "b": (4,)}),
    ("linear", {"w": (4, 5), "b": (5,)}),
    ("lm_head", {"wte": (5, 4)}),
])
def test_backward_accumulates_into_gradient_buffers(layer, shapes):
    once = {name: np.zeros(shape) for name, shape in shapes.items()}
    backward_into(np.random.default_rng(1), layer, once)
    twice = {name: np.zeros(shape) for name, shape in shapes.items()}
    for _ in range(2):
        backward_into(np.random.default_rng(1), layer, twice)        # the same inputs and dout both times
    for name in shapes:
        assert once[name].any()
        # not bit-equal: add.at sums a repeated token's rows onto a non-zero buffer the second time
        np.testing.assert_allclose(twice[name], 2 * once[name], rtol=1e-12, err_msg=name)


TINY = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=5, vocab_size=11)


def test_whole_model_gradient_matches_finite_differences():
    assert verify.gradcheck(TINY, seed=0, verbose=False).finish() == 0


@pytest.mark.parametrize("layer", ["gelu_backward", "attention_backward"])
def test_whole_model_gradcheck_fails_when_a_backward_is_off_by_one_percent(monkeypatch, layer):
    right = getattr(model, layer)
    monkeypatch.setattr(model, layer, lambda dout, cache: 1.01 * right(dout, cache))
    report = verify.gradcheck(GPTConfig(n_layer=1, n_head=2, n_embd=4, block_size=3, vocab_size=5),
                              seed=0, verbose=False)
    assert report.finish() == 1
    ok = dict(report.rows)
    assert not ok["h.0.attn.c_attn.w"]                              # upstream of both layers: wrong
    assert ok["h.0.mlp.c_proj.w"] and ok["ln_f.w"]                  # downstream of both: still right


def test_verify_script_exits_0_with_a_pass_line():
    result = run(["01_single_core/verify.py"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("PASS:")


def float_arrays(obj):
    """Every floating-point ndarray inside nested tuples, lists and dicts."""
    if isinstance(obj, np.ndarray):
        return [obj] if np.issubdtype(obj.dtype, np.floating) else []
    if isinstance(obj, (tuple, list)):
        return [a for item in obj for a in float_arrays(item)]
    if isinstance(obj, dict):
        return float_arrays(list(obj.values()))
    return []


def test_float32_model_keeps_every_activation_and_gradient_in_float32(monkeypatch):
    """A float64 intermediate would be silently cast back by `+=`, so spy on what every layer returns."""
    returned = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            returned.append((name, out))
            return out
        return wrapped

    for name in dir(model):
        if name.endswith(("_forward", "_backward")):
            monkeypatch.setattr(model, name, spy(name, getattr(model, name)))
    layout = model.gpt_layout(TINY)
    params = model.init_params(TINY, 0, np.float32)
    grads = np.zeros_like(params)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, TINY.vocab_size, (2, 2, TINY.block_size))  # (B,T) each
    logits, loss, cache = model.gpt_forward(layout.views(params), idx, targets, TINY)
    model.gpt_backward(cache, layout.views(params), layout.views(grads))

    assert logits.dtype == np.float32 and grads.dtype == np.float32 and grads.any()
    names = {name for name, _ in returned}
    assert {"cross_entropy_backward", "attention_backward", "gelu_backward", "layernorm_backward"} <= names
    wrong = {(name, str(a.dtype)) for name, out in returned for a in float_arrays(out) if a.dtype != np.float32}
    assert not wrong
