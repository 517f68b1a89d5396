"""A GPT-2 style decoder in NumPy: every layer is a forward/backward pair of free functions.

Forward returns `(out, cache)`; backward takes `dout` and that cache, accumulates parameter gradients with
`+=` into gradient views and returns the gradient of the input. Nothing is stored on objects, so any number
of micro-batches can be in flight. Shapes: B batch, T time, C n_embd, V vocab, nh heads, hs head size.
"""
import contextlib
import functools
import math

import numpy as np

from common.params import Layout, sub

GELU_C = math.sqrt(2.0 / math.pi)  # a Python float, so float32 arrays stay float32
LN_EPS = 1e-5


# ----------------------------------------------------------------------------- helpers
# Summing rows of 64-128 numbers with .sum(axis) runs NumPy's pairwise loop row by row; a product with a
# vector of ones is one BLAS matrix-vector call and 3-7x faster for the short rows of this model.

@functools.cache
def _ones(n, dtype):
    ones = np.ones(n, dtype=dtype)
    ones.flags.writeable = False
    return ones


def rowsum(x):
    """x.sum(axis=-1, keepdims=True)."""
    n = x.shape[-1]
    return (x.reshape(-1, n) @ _ones(n, x.dtype)).reshape(*x.shape[:-1], 1)


def rowmean(x):
    """x.mean(axis=-1, keepdims=True)."""
    out = rowsum(x)
    out *= 1.0 / x.shape[-1]
    return out


def colsum(x):
    """x summed over every axis but the last: (..., C) -> (C,)."""
    x2 = x.reshape(-1, x.shape[-1])
    return _ones(x2.shape[0], x.dtype) @ x2


def chunks(x, nbytes=1 << 20):
    """Slices of x's first axis of about 1 MiB each. Elementwise work done chunk by chunk keeps its operands
    in the L2 cache through all of its passes: 1.5-2x faster on the baby GPT's 100 MB activations."""
    step = max(1, nbytes // (x[0].nbytes or 1))
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


@functools.cache
def causal_mask(T, dtype):
    """(T,T) additive mask: 0 on and below the diagonal, -inf above it."""
    mask = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    mask.flags.writeable = False
    return mask


# ----------------------------------------------------------------------------- layers

def embedding_forward(idx, wte, wpe):
    T = idx.shape[1]
    return wte[idx] + wpe[:T], idx                                  # (B,T,C)


def embedding_backward(dout, idx, dwte, dwpe):
    # in the forward pass this was: out = wte[idx] + wpe[:T]
    T = idx.shape[1]
    dwpe[:T] += dout.sum(axis=0)
    scatter_add_rows(dwte, idx.ravel(), dout.reshape(-1, dout.shape[-1]))


def scatter_add_rows(dst, rows, src):
    """dst[rows] += src where a row listed n times gets the sum of its n source rows. Sorting the rows and
    summing each run with reduceat is ~6x faster than np.add.at here."""
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])        # first position of each distinct row
    if rows.size:
        dst[rows[starts]] += np.add.reduceat(src[order], starts, axis=0)


def layernorm_forward(x, w, b):
    xhat = x - rowmean(x)                                           # (B,T,C), centred
    rstd = rowmean(np.square(xhat))                                 # (B,T,1), the variance for now
    rstd += LN_EPS
    np.sqrt(rstd, out=rstd)
    np.reciprocal(rstd, out=rstd)
    xhat *= rstd
    out = xhat * w
    out += b
    return out, (xhat, rstd)        # not w: the backward is given it again, so no cache holds on to a weight


def layernorm_backward(dout, cache, w, dw, db):
    xhat, rstd = cache
    dw += colsum(dout * xhat)
    db += colsum(dout)
    # out = xhat*w + b with xhat = (x - mean) * rstd: the mean and the variance both depend on every x
    dxhat = dout * w
    dx = xhat * rowmean(dxhat * xhat)
    np.subtract(dxhat, dx, out=dx)
    dx -= rowmean(dxhat)
    dx *= rstd
    return dx                                                       # rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))


def linear_forward(x, w, b):
    """x @ w + b; b None leaves the bias out (tensor parallelism adds it after a reduction)."""
    out = (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[1])  # (B,T,C) @ (C,OC) -> (B,T,OC)
    if b is not None:
        out += b
    return out, x


def linear_backward(dout, x, w, dw, db):
    dout2 = dout.reshape(-1, dout.shape[-1])                        # (B*T,OC)
    dw += x.reshape(-1, x.shape[-1]).T @ dout2                      # (C,OC)
    if db is not None:
        db += colsum(dout2)
    return (dout2 @ w.T).reshape(*dout.shape[:-1], w.shape[0])      # (B,T,OC) @ (OC,C) -> (B,T,C)


def attention_forward(qkv, n_head):
    """Causal multi-head self-attention on packed [q | k | v] columns; each third holds n_head heads."""
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    q, k, v = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # each (B,nh,T,hs)
    att = np.empty((B, n_head, T, T), dtype=qkv.dtype)
    y = np.empty((B, T, n_head, hs), dtype=qkv.dtype)
    for b in chunks(att):
        a = np.matmul(q[b], k[b].transpose(0, 1, 3, 2), out=att[b])     # (b,nh,T,T)
        a *= 1.0 / math.sqrt(hs)
        a += causal_mask(T, a.dtype)                                     # position t sees only 0..t
        a -= a.max(axis=-1, keepdims=True)
        np.exp(a, out=a)
        a /= rowsum(a)
        y[b] = (a @ v[b]).transpose(0, 2, 1, 3)                          # (b,nh,T,T) @ (b,nh,T,hs)
    return y.reshape(B, T, n_head * hs), (q, k, v, att)


def attention_backward(dout, cache):
    q, k, v, att = cache
    B, nh, T, hs = q.shape
    dy = dout.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)               # (B,nh,T,hs)
    dqkv = np.empty((B, T, 3, nh, hs), dtype=dout.dtype)
    for b in chunks(att):
        a = att[b]
        # in the forward pass this was: y = att @ v
        datt = dy[b] @ v[b].transpose(0, 1, 3, 2)                        # (b,nh,T,T)
        dqkv[b, :, 2] = (a.transpose(0, 1, 3, 2) @ dy[b]).transpose(0, 2, 1, 3)
        # att = softmax(pre): dpre = att * (datt - sum(datt * att)); masked entries have att = 0
        dpre = datt * a
        datt -= rowsum(dpre)
        np.multiply(datt, a, out=dpre)
        dpre *= 1.0 / math.sqrt(hs)
        dqkv[b, :, 0] = (dpre @ k[b]).transpose(0, 2, 1, 3)             # pre = q @ k^T * scale
        dqkv[b, :, 1] = (dpre.transpose(0, 1, 3, 2) @ q[b]).transpose(0, 2, 1, 3)
    return dqkv.reshape(B, T, 3 * nh * hs)


def gelu_forward(x):
    """GELU, tanh approximation (as GPT-2 and llm.c)."""
    out, t = np.empty_like(x), np.empty_like(x)
    x2, t2, out2 = (a.reshape(-1, x.shape[-1]) for a in (x, t, out))
    for r in chunks(x2):                # x, t and out of one chunk stay in cache through all the passes
        xr, tr, o = x2[r], t2[r], out2[r]
        np.multiply(xr, xr, out=tr)
        tr *= 0.044715 * GELU_C
        tr += GELU_C
        tr *= xr
        np.tanh(tr, out=tr)                 # tanh(c (x + 0.044715 x^3))
        np.add(tr, 1.0, out=o)
        o *= xr
        o *= 0.5
    return out, (x, t)


def gelu_backward(dout, cache):
    x, t = cache
    dx = np.empty_like(dout)
    x2, t2, dout2, dx2 = (a.reshape(-1, x.shape[-1]) for a in (x, t, dout, dx))
    for r in chunks(x2):
        # out = 0.5 x (1 + tanh(u)) with u = c (x + 0.044715 x^3), so
        # dout/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 0.044715 x^2)
        xr, tr, d = x2[r], t2[r], dx2[r]
        du = xr * xr
        du *= 3 * 0.044715 * GELU_C
        du += GELU_C
        du *= xr
        np.multiply(tr, tr, out=d)
        np.subtract(1.0, d, out=d)
        d *= du
        d += tr
        d += 1.0
        d *= 0.5
        d *= dout2[r]
    return dx


def lm_head_forward(x, wte):
    """Logits from the token embedding itself (weight tying): x @ wte^T."""
    B, T, C = x.shape
    return (x.reshape(-1, C) @ wte.T).reshape(B, T, -1), x          # (B,T,C) @ (C,V) -> (B,T,V)


def lm_head_backward(dout, x, wte, dwte):
    C = x.shape[-1]
    dout2 = dout.reshape(-1, dout.shape[-1])                        # (B*T,V)
    dwte += dout2.T @ x.reshape(-1, C)                              # (V,C)
    return (dout2 @ wte).reshape(x.shape)                           # (B,T,C)


def cross_entropy_forward(logits, targets):
    """Mean softmax cross-entropy over all B*T positions."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V) - logits.reshape(-1, V).max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    probs = z / z.sum(axis=-1, keepdims=True)                       # (B*T,V)
    rows = np.arange(probs.shape[0])
    loss = -np.log(probs[rows, targets.ravel()]).mean()
    return float(loss), (probs, targets)


def cross_entropy_backward(dloss, cache):
    probs, targets = cache
    # loss = -mean(log probs[target]): dlogits = (probs - onehot(target)) / N
    dlogits = probs.copy()
    dlogits[np.arange(probs.shape[0]), targets.ravel()] -= 1.0
    dlogits *= dloss / probs.shape[0]
    return dlogits.reshape(*targets.shape, -1)                      # (B,T,V)


# ----------------------------------------------------------------------------- the transformer block

def block_forward(x, p, n_head):
    """x + attn(ln_1(x)), then + mlp(ln_2(.)); `p` holds this block's views ("ln_1.w", ...)."""
    h, c_ln1 = layernorm_forward(x, p["ln_1.w"], p["ln_1.b"])
    h, c_qkv = linear_forward(h, p["attn.c_attn.w"], p["attn.c_attn.b"])   # (B,T,3C)
    h, c_att = attention_forward(h, n_head)
    h, c_proj = linear_forward(h, p["attn.c_proj.w"], p["attn.c_proj.b"])
    x = x + h
    h, c_ln2 = layernorm_forward(x, p["ln_2.w"], p["ln_2.b"])
    h, c_fc = linear_forward(h, p["mlp.c_fc.w"], p["mlp.c_fc.b"])          # (B,T,4C)
    h, c_gelu = gelu_forward(h)
    h, c_mproj = linear_forward(h, p["mlp.c_proj.w"], p["mlp.c_proj.b"])
    return x + h, (c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mproj)


def block_backward(dout, cache, p, g):
    c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mproj = cache
    dh = linear_backward(dout, c_mproj, p["mlp.c_proj.w"], g["mlp.c_proj.w"], g["mlp.c_proj.b"])
    dh = gelu_backward(dh, c_gelu)
    dh = linear_backward(dh, c_fc, p["mlp.c_fc.w"], g["mlp.c_fc.w"], g["mlp.c_fc.b"])
    dx = dout + layernorm_backward(dh, c_ln2, p["ln_2.w"], g["ln_2.w"], g["ln_2.b"])  # the residual adds its path
    dh = linear_backward(dx, c_proj, p["attn.c_proj.w"], g["attn.c_proj.w"], g["attn.c_proj.b"])
    dh = attention_backward(dh, c_att)
    dh = linear_backward(dh, c_qkv, p["attn.c_attn.w"], g["attn.c_attn.w"], g["attn.c_attn.b"])
    return dx + layernorm_backward(dh, c_ln1, p["ln_1.w"], g["ln_1.w"], g["ln_1.b"])


# ----------------------------------------------------------------------------- the model

def block_shapes(C):
    """The parameters of one transformer block of width C, in buffer order."""
    return [("ln_1.w", (C,)), ("ln_1.b", (C,)),
            ("attn.c_attn.w", (C, 3 * C)), ("attn.c_attn.b", (3 * C,)),
            ("attn.c_proj.w", (C, C)), ("attn.c_proj.b", (C,)),
            ("ln_2.w", (C,)), ("ln_2.b", (C,)),
            ("mlp.c_fc.w", (C, 4 * C)), ("mlp.c_fc.b", (4 * C,)),
            ("mlp.c_proj.w", (4 * C, C)), ("mlp.c_proj.b", (C,))]


def param_shapes(cfg):
    """Every parameter's name and shape, in the order of the flat buffer. Weights are (in, out)."""
    C, V, T = cfg.n_embd, cfg.vocab_size, cfg.block_size
    shapes = [("wte", (V, C)), ("wpe", (T, C))]
    for i in range(cfg.n_layer):
        shapes += [(f"h.{i}.{name}", shape) for name, shape in block_shapes(C)]
    return shapes + [("ln_f.w", (C,)), ("ln_f.b", (C,))]


def gpt_layout(cfg):
    return Layout(param_shapes(cfg))


def init_params(cfg, seed, dtype):
    """nanoGPT's initialisation, drawn in float64 from `seed` so every dtype and layout starts identical:
    N(0, 0.02) for weights and embeddings, residual projections scaled by 1/sqrt(2 n_layer), zero biases,
    unit LayerNorm gains. Returns the flat parameter buffer."""
    layout = gpt_layout(cfg)
    rng = np.random.default_rng(seed)
    flat = np.zeros(layout.size, dtype=dtype)
    views = layout.views(flat)
    for name, shape in layout.shapes.items():
        if name.endswith(("ln_1.w", "ln_2.w", "ln_f.w")):
            views[name][...] = 1.0
        elif len(shape) == 2:
            std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.w") else 0.02
            views[name][...] = rng.normal(0.0, std, size=shape)
    return flat


def modules(cfg):
    """The parameters each part of gpt_forward reads, in the order it runs them: the embedding, every block,
    and the head (the final LayerNorm and the tied wte). The backward runs them in reverse."""
    block = [name for name, _ in block_shapes(cfg.n_embd)]
    return {"embedding": ("wte", "wpe"),
            **{f"h.{i}": tuple(f"h.{i}.{name}" for name in block) for i in range(cfg.n_layer)},
            "head": ("ln_f.w", "ln_f.b", "wte")}


def _no_hook(module):
    return contextlib.nullcontext()


def stage_forward(p, inp, targets, cfg, layers, first=True, last=True, using=_no_hook):
    """Run the part of the model a pipeline stage holds: the embedding if `first` (inp: token ids (B,T)),
    blocks `layers` (else inp: activations (B,T,C)), and the head if `last`. Returns (out, loss, cache):
    the logits and, given targets, the mean cross-entropy on the last stage; activations elsewhere.
    Each part runs inside `with using(part)` (see `modules`): a hook for ZeRO-3 to gather that part's weights
    into `p` just before it runs and free them right after."""
    x, c_emb = inp, None
    if first:
        with using("embedding"):
            x, c_emb = embedding_forward(inp, p["wte"], p["wpe"])
    c_blocks = []
    for i in layers:
        with using(f"h.{i}"):
            x, c = block_forward(x, sub(p, f"h.{i}."), cfg.n_head)
        c_blocks.append(c)
    if not last:
        return x, None, (first, last, layers, c_emb, c_blocks)
    with using("head"):
        x, c_lnf = layernorm_forward(x, p["ln_f.w"], p["ln_f.b"])
        logits, c_head = lm_head_forward(x, p["wte"])
    if targets is None:
        return logits, None, None
    loss, c_loss = cross_entropy_forward(logits, targets)
    return logits, loss, (first, last, layers, c_emb, c_blocks, c_lnf, c_head, c_loss)


def stage_backward(cache, p, g, dout, grads_ready=None, using=_no_hook):
    """Accumulate the parameter gradients of a stage_forward into the views `g`; dout is d(loss)'s scale (a
    number) on the last stage, the gradient of the stage's output elsewhere. Returns the gradient of the
    stage's input activations (None on the first stage). grads_ready(name), if given, is called as soon as
    the gradients of `name` and of every tensor after it in the layout are final: a hook for starting their
    communication while the backward goes on. `using` is stage_forward's, here also the moment ZeRO-2/3
    can put a part's gradient buffers into `g`."""
    ready = grads_ready or (lambda name: None)
    first, last, layers, c_emb, c_blocks, *c_head = cache
    dx = dout
    if last:
        c_lnf, c_head, c_loss = c_head
        dlogits = cross_entropy_backward(dout, c_loss)
        with using("head"):
            dx = lm_head_backward(dlogits, c_head, p["wte"], g["wte"])
            dx = layernorm_backward(dx, c_lnf, p["ln_f.w"], g["ln_f.w"], g["ln_f.b"])
        ready("ln_f.w")
    for i, c in zip(reversed(layers), reversed(c_blocks)):
        with using(f"h.{i}"):
            dx = block_backward(dx, c, sub(p, f"h.{i}."), sub(g, f"h.{i}."))
        ready(f"h.{i}.ln_1.w")
    if not first:
        return dx
    with using("embedding"):
        embedding_backward(dx, c_emb, g["wte"], g["wpe"])        # wte's gradient also has the LM head's part
    ready("wte")
    return None


def gpt_forward(p, idx, targets, cfg, using=_no_hook):
    """Logits (B,T,V) and, when targets are given, the mean cross-entropy loss; plus the cache for backward."""
    return stage_forward(p, idx, targets, cfg, range(cfg.n_layer), using=using)


def gpt_backward(cache, p, g, dloss=1.0, grads_ready=None, using=_no_hook):
    """Accumulate d(dloss * loss)/d(param) into the gradient views `g` (hooks: see stage_backward)."""
    stage_backward(cache, p, g, dloss, grads_ready, using)


def generate(p, cfg, idx, max_new_tokens, rng, temperature=1.0, top_k=None):
    """Append `max_new_tokens` sampled tokens to idx (B,T), cropping the context to block_size."""
    for _ in range(max_new_tokens):
        logits, _, _ = gpt_forward(p, idx[:, -cfg.block_size:], None, cfg)
        logits = logits[:, -1, :].astype(np.float64) / temperature          # (B,V)
        if top_k is not None and top_k < logits.shape[-1]:
            kth = np.partition(logits, -top_k, axis=-1)[:, -top_k, None]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        nxt = np.array([[rng.choice(probs.shape[-1], p=row)] for row in probs])
        idx = np.concatenate([idx, nxt], axis=1)
    return idx
