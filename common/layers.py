"""The layers of the GPT as forward/backward pairs of free functions, and the small kernels they share.

Forward returns `(out, cache)`; backward takes `dout` and that cache, adds the parameter gradients into
gradient views (`+=`) and returns the gradient of the input. A layer with weights computes two things in its
backward: the input gradient, which the layer before it waits for, and the weight gradients, which nothing
needs until the optimizer step; each is a function of its own (`..._input_grad`, `..._weight_grads`), which
its backward calls in turn. Nothing is stored on objects, so any number of micro-batches can be in flight.
Shapes: B batch, T time, C n_embd, V vocab, nh heads, hs head size.
"""
import functools
import math

import numpy as np

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
    return row_chunks(x.shape[0], x[0].nbytes if len(x) else 0, nbytes)       # (an expert may get no rows)


def row_chunks(rows, row_bytes, nbytes=1 << 20):
    """chunks() of an array of `rows` rows of `row_bytes` each, without the array."""
    step = max(1, nbytes // (row_bytes or 1))
    return [slice(i, i + step) for i in range(0, rows, step)]


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
    layernorm_weight_grads(dout, cache[0], dw, db)
    return layernorm_input_grad(dout, cache, w)


def layernorm_weight_grads(dout, xhat, dw, db):
    dw += colsum(dout * xhat)
    db += colsum(dout)


def layernorm_input_grad(dout, cache, w):
    xhat, rstd = cache
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
    linear_weight_grads(dout, x, dw, db)
    return linear_input_grad(dout, w)


def linear_weight_grads(dout, x, dw, db):
    dout2 = dout.reshape(-1, dout.shape[-1])                        # (B*T,OC)
    dw += x.reshape(-1, x.shape[-1]).T @ dout2                      # (C,OC)
    if db is not None:
        db += colsum(dout2)


def linear_input_grad(dout, w):
    dout2 = dout.reshape(-1, dout.shape[-1])
    return (dout2 @ w.T).reshape(*dout.shape[:-1], w.shape[0])      # (B,T,OC) @ (OC,C) -> (B,T,C)


def attention_probs(q, k, out):
    """softmax(q k^T / sqrt(hs) + causal mask) into `out`, (b,nh,T,T): the forward's and, when the scores are
    recomputed, the backward's, by the same operations in the same order, so bit for bit the same."""
    T, hs = q.shape[-2:]
    a = np.matmul(q, k.transpose(0, 1, 3, 2), out=out)                  # (b,nh,T,T)
    a *= 1.0 / math.sqrt(hs)
    a += causal_mask(T, a.dtype)                                         # position t sees only 0..t
    a -= a.max(axis=-1, keepdims=True)
    np.exp(a, out=a)
    a /= rowsum(a)
    return a


def scores_buffer(q):
    """An empty (b,nh,T,T) array for the scores of q (b,nh,T,hs)."""
    return np.empty((*q.shape[:-1], q.shape[-2]), dtype=q.dtype)


def score_chunks(q):
    """The row chunks (of about 1 MiB of scores each) attention works in, for q (B,nh,T,hs)."""
    B, nh, T, _ = q.shape
    return row_chunks(B, nh * T * T * q.itemsize)


def attention_forward(qkv, n_head, keep_scores=True):
    """Causal multi-head self-attention on packed [q | k | v] columns; each third holds n_head heads. With
    keep_scores False the cache leaves out the (B,nh,T,T) probabilities, and the backward recomputes them
    chunk by chunk (selective recomputation, as in Megatron-LM)."""
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    q, k, v = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # each (B,nh,T,hs)
    att = np.empty((B, n_head, T, T), dtype=qkv.dtype) if keep_scores else None
    y = np.empty((B, T, n_head, hs), dtype=qkv.dtype)
    for b in score_chunks(q):
        a = attention_probs(q[b], k[b], att[b] if keep_scores else scores_buffer(q[b]))
        y[b] = (a @ v[b]).transpose(0, 2, 1, 3)                          # (b,nh,T,T) @ (b,nh,T,hs)
    return y.reshape(B, T, n_head * hs), (q, k, v, att)


def attention_backward(dout, cache):
    q, k, v, att = cache
    B, nh, T, hs = q.shape
    dy = dout.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)               # (B,nh,T,hs)
    dqkv = np.empty((B, T, 3, nh, hs), dtype=dout.dtype)
    for b in score_chunks(q):
        # the probabilities the forward kept, or the same ones computed again (selective recomputation)
        a = att[b] if att is not None else attention_probs(q[b], k[b], scores_buffer(q[b]))
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
    lm_head_weight_grads(dout, x, dwte)
    return lm_head_input_grad(dout, wte)


def lm_head_weight_grads(dout, x, dwte):
    dwte += dout.reshape(-1, dout.shape[-1]).T @ x.reshape(-1, x.shape[-1])    # (V,C)


def lm_head_input_grad(dout, wte):
    return (dout.reshape(-1, dout.shape[-1]) @ wte).reshape(*dout.shape[:-1], wte.shape[1])    # (B,T,C)


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
    # loss = -mean(log probs[target]): dlogits = (probs - onehot(target)) / N, made in place (a cache is used once)
    dlogits = probs
    dlogits[np.arange(probs.shape[0]), targets.ravel()] -= 1.0
    dlogits *= dloss / probs.shape[0]
    return dlogits.reshape(*targets.shape, -1)                      # (B,T,V)
