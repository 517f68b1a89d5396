"""Megatron-LM tensor parallelism: every weight matrix split across the `tp` ranks of one communicator.

The math. A column-parallel linear splits W = [W_1 | ... | W_N] by output columns, so rank i computes
x W_i from the full input x; a row-parallel linear splits W by input rows, so rank i computes x_i W_i from
its slice of the input, and the output is the sum over ranks. Chaining column then row needs no
communication in between: attention's c_attn is column-parallel by heads (rank i owns n_head/N whole
heads, each head's q, k and v columns), each rank runs attention on its heads, and c_proj is row-parallel
over those same heads; the MLP's c_fc is column-parallel, GELU acts elementwise, c_proj is row-parallel.
Two conjugate operators are all the communication a block needs (Megatron's f and g):
    f = copy_to_tp:      forward identity,   backward all-reduce   (before each column-parallel linear)
    g = reduce_from_tp:  forward all-reduce, backward identity     (after each row-parallel linear)
Row-parallel biases and LayerNorms are replicated and applied after g, so their gradients agree on every
rank without any synchronisation. The token embedding is vocab-parallel (rank i holds rows
[i V/N, (i+1) V/N) of the vocabulary padded to a multiple of N): a masked lookup, then g. The tied LM head
gives each rank the logits of its vocabulary slice, and the cross-entropy never gathers them: all-reduces
of the row max, the sum of exponentials and the target's logit give log-sum-exp and the loss. Padding rows
get logit -inf, so they never win and never receive gradient.

Communication per step, per rank, for B*T tokens of C channels (e = bytes per element):
    forward:  g in each block's attention and MLP, and after the embedding   (2 L + 1) all-reduces of B T C e
              the cross-entropy: max, sum of exponentials, target logit       3 all-reduces of B T e
    backward: f before each block's c_attn and c_fc, and before the LM head  (2 L + 1) all-reduces of B T C e
"""
import numpy as np

from common.config import ConfigError
from common.model import (attention_backward, attention_forward, gelu_backward, gelu_forward, layernorm_backward,
                          layernorm_forward, linear_backward, linear_forward, lm_head_backward, lm_head_forward,
                          param_shapes, rowsum, scatter_add_rows)
from common.params import Layout, sub


# ----------------------------------------------------------------------------- shard

def check_layout(cfg, tp):
    """Raise ConfigError unless the model splits evenly over `tp` ranks."""
    if cfg.n_head % tp:
        divisors = [d for d in range(1, cfg.n_head + 1) if cfg.n_head % d == 0]
        raise ConfigError(f"--tp {tp} does not divide n_head={cfg.n_head}; choose one of {divisors}")


def padded_vocab(V, tp):
    return -(-V // tp) * tp


def kind(name):
    """How a single-core tensor is split: by vocabulary rows, by heads (packed q|k|v), by columns, by rows, or not."""
    if name == "wte":
        return "vocab"
    if name.endswith("c_attn.w") or name.endswith("c_attn.b"):
        return "heads"
    if name.endswith("c_fc.w") or name.endswith("c_fc.b"):
        return "columns"
    if name.endswith("c_proj.w"):
        return "rows"
    return "replicated"


def shard_tensor(name, full, cfg, tp, rank):
    """This rank's piece of the single-core tensor `full`."""
    k = kind(name)
    if k == "vocab":
        Vl = padded_vocab(cfg.vocab_size, tp) // tp
        padded = np.zeros((Vl * tp, full.shape[1]), dtype=full.dtype)
        padded[:cfg.vocab_size] = full
        return padded[rank * Vl:(rank + 1) * Vl]
    if k == "heads":                                    # (..., 3C) -> (..., 3, nh, hs) -> this rank's heads
        nhl = cfg.n_head // tp
        heads = full.reshape(*full.shape[:-1], 3, cfg.n_head, cfg.head_size)
        return heads[..., rank * nhl:(rank + 1) * nhl, :].reshape(*full.shape[:-1], -1)
    if k == "columns":
        return np.split(full, tp, axis=-1)[rank]
    if k == "rows":
        return np.split(full, tp, axis=0)[rank]
    return full


def unshard_tensor(name, pieces, cfg):
    """The single-core tensor from every rank's piece, in rank order (the inverse of shard_tensor)."""
    k = kind(name)
    if k == "vocab":
        return np.concatenate(pieces, axis=0)[:cfg.vocab_size]
    if k == "heads":
        lead = pieces[0].shape[:-1]
        heads = [p.reshape(*lead, 3, -1, cfg.head_size) for p in pieces]
        return np.concatenate(heads, axis=-2).reshape(*lead, -1)
    if k == "columns":
        return np.concatenate(pieces, axis=-1)
    if k == "rows":
        return np.concatenate(pieces, axis=0)
    return pieces[0]


def tp_layout(cfg, tp):
    """The layout of one rank's flat buffer: the single-core names with their per-rank shapes."""
    dummy = {name: np.empty(shape, dtype=np.uint8) for name, shape in param_shapes(cfg)}
    return Layout([(name, shard_tensor(name, a, cfg, tp, 0).shape) for name, a in dummy.items()])


def shard(full_views, layout, cfg, tp, rank, dtype):
    """A flat per-rank buffer holding this rank's pieces of the single-core tensors `full_views`."""
    flat = np.zeros(layout.size, dtype=dtype)
    for name, view in layout.views(flat).items():
        view[...] = shard_tensor(name, full_views[name], cfg, tp, rank)
    return flat


def unshard(flat, layout, cfg, comm):
    """Every single-core tensor, whole, on every rank: one all-gather of the flat per-rank buffers."""
    gathered = comm.allgather(flat, np.empty((comm.size, flat.size), dtype=flat.dtype))
    views = [layout.views(row) for row in gathered]
    return {name: unshard_tensor(name, [v[name] for v in views], cfg) for name in layout.shapes}


# ----------------------------------------------------------------------------- forward and backward

def copy_to_tp_backward(dx, tp):
    """f: the forward is the identity; the backward sums the partial input gradients of the ranks."""
    return tp.allreduce(dx)


def reduce_from_tp_forward(x, tp):
    """g: the forward sums the ranks' partial outputs; the backward is the identity."""
    return tp.allreduce(x)


def block_forward(x, p, n_head_local, tp):
    h, c_ln1 = layernorm_forward(x, p["ln_1.w"], p["ln_1.b"])                 # f: identity
    h, c_qkv = linear_forward(h, p["attn.c_attn.w"], p["attn.c_attn.b"])     # column-parallel: my heads' q|k|v
    h, c_att = attention_forward(h, n_head_local)
    h, c_proj = linear_forward(h, p["attn.c_proj.w"], None)                  # row-parallel: a partial sum
    h = reduce_from_tp_forward(h, tp)
    h += p["attn.c_proj.b"]
    x = x + h
    h, c_ln2 = layernorm_forward(x, p["ln_2.w"], p["ln_2.b"])                 # f: identity
    h, c_fc = linear_forward(h, p["mlp.c_fc.w"], p["mlp.c_fc.b"])            # column-parallel
    h, c_gelu = gelu_forward(h)
    h, c_mproj = linear_forward(h, p["mlp.c_proj.w"], None)                  # row-parallel
    h = reduce_from_tp_forward(h, tp)
    h += p["mlp.c_proj.b"]
    return x + h, (c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mproj)


def block_backward(dout, cache, p, g, tp):
    c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mproj = cache
    dh = linear_backward(dout, c_mproj, p["mlp.c_proj.w"], g["mlp.c_proj.w"], g["mlp.c_proj.b"])  # g: identity
    dh = gelu_backward(dh, c_gelu)
    dh = linear_backward(dh, c_fc, p["mlp.c_fc.w"], g["mlp.c_fc.w"], g["mlp.c_fc.b"])
    dh = copy_to_tp_backward(dh, tp)
    dx = dout + layernorm_backward(dh, c_ln2, g["ln_2.w"], g["ln_2.b"])
    dh = linear_backward(dx, c_proj, p["attn.c_proj.w"], g["attn.c_proj.w"], g["attn.c_proj.b"])
    dh = attention_backward(dh, c_att)
    dh = linear_backward(dh, c_qkv, p["attn.c_attn.w"], g["attn.c_attn.w"], g["attn.c_attn.b"])
    dh = copy_to_tp_backward(dh, tp)
    return dx + layernorm_backward(dh, c_ln1, g["ln_1.w"], g["ln_1.b"])


def vocab_embedding_forward(idx, wte, wpe, tp):
    """Each rank looks up the tokens of its vocabulary slice (zeros elsewhere), then g sums the slices."""
    local = idx - tp.rank * wte.shape[0]
    mine = (local >= 0) & (local < wte.shape[0])
    x = wte[np.where(mine, local, 0)]                                         # (B,T,C)
    x[~mine] = 0.0
    x = reduce_from_tp_forward(x, tp)
    x += wpe[:idx.shape[1]]
    return x, (local, mine)


def vocab_embedding_backward(dout, cache, dwte, dwpe):
    local, mine = cache
    dwpe[:local.shape[1]] += dout.sum(axis=0)
    scatter_add_rows(dwte, local[mine], dout[mine])                           # only my vocabulary's rows


def vocab_cross_entropy_forward(x, wte, targets, vocab_size, tp):
    """Mean cross-entropy of the tied head's logits, each rank holding the logits of its vocabulary slice."""
    logits, c_head = lm_head_forward(x, wte)                                  # (B,T,V/N), f: identity
    Vl = wte.shape[0]
    lo = tp.rank * Vl
    logits[..., max(0, min(Vl, vocab_size - lo)):] = -np.inf                  # padding rows never win
    z = logits.reshape(-1, Vl)                                                # (N,V/N)
    m = tp.allreduce(z.max(axis=-1, keepdims=True), op="max")                 # the global row max
    e = np.exp(z - m)
    s = tp.allreduce(rowsum(e))                                               # sum of exponentials over V
    t = targets.ravel() - lo
    mine = (t >= 0) & (t < Vl)
    rows = np.flatnonzero(mine)
    zt = np.zeros_like(m)
    zt[rows, 0] = z[rows, t[rows]]
    zt = tp.allreduce(zt)                                                     # the target's logit
    loss = float((np.log(s) + m - zt).mean())
    e /= s
    return logits, loss, (e, t, rows, c_head)


def vocab_cross_entropy_backward(dloss, cache, wte, dwte, tp):
    probs, t, rows, c_head = cache
    # loss = mean(log sum exp z - z[target]): dz = (softmax(z) - onehot(target)) / N on my vocabulary slice
    dz = probs
    dz[rows, t[rows]] -= 1.0
    dz *= dloss / dz.shape[0]
    dx = lm_head_backward(dz.reshape(*c_head.shape[:-1], -1), c_head, wte, dwte)
    return copy_to_tp_backward(dx, tp)


def tp_forward(p, idx, targets, cfg, tp):
    """This rank's logits (B,T,V_padded/N) and the loss, equal to the single-core model's on every rank."""
    x, c_emb = vocab_embedding_forward(idx, p["wte"], p["wpe"], tp)
    c_blocks = []
    for i in range(cfg.n_layer):
        x, c = block_forward(x, sub(p, f"h.{i}."), cfg.n_head // tp.size, tp)
        c_blocks.append(c)
    x, c_lnf = layernorm_forward(x, p["ln_f.w"], p["ln_f.b"])
    logits, loss, c_ce = vocab_cross_entropy_forward(x, p["wte"], targets, cfg.vocab_size, tp)
    return logits, loss, (c_emb, c_blocks, c_lnf, c_ce)


def tp_backward(cache, p, g, tp, dloss=1.0):
    """Accumulate this rank's gradients; replicated tensors get the same gradient on every rank."""
    c_emb, c_blocks, c_lnf, c_ce = cache
    dx = vocab_cross_entropy_backward(dloss, c_ce, p["wte"], g["wte"], tp)
    dx = layernorm_backward(dx, c_lnf, g["ln_f.w"], g["ln_f.b"])
    for i in reversed(range(len(c_blocks))):
        dx = block_backward(dx, c_blocks[i], sub(p, f"h.{i}."), sub(g, f"h.{i}."), tp)
    vocab_embedding_backward(dx, c_emb, g["wte"], g["wpe"])


# ----------------------------------------------------------------------------- synchronise gradients
# Nothing to do: every replicated tensor (LayerNorms, row-parallel biases, wpe) sees the same, already
# reduced activations and gradients on every rank, so its gradient is identical everywhere; verify.py checks
# that it is. The global gradient norm for clipping is the sum over ranks of the sharded tensors' squares
# plus the replicated tensors' squares counted once.

def grad_norm(grads, layout, tp):
    """The single-core model's gradient L2 norm, from this rank's flat gradient."""
    sharded = np.zeros(1, dtype=np.float64)
    replicated = 0.0
    for name, (a, b) in layout.offsets.items():
        sq = float(np.dot(grads[a:b], grads[a:b]))
        if kind(name) == "replicated":
            replicated += sq
        else:
            sharded[0] += sq
    return float(np.sqrt(tp.allreduce(sharded)[0] + replicated))
