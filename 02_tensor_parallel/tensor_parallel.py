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

Sequence parallelism (`sp`) also splits what lies between the blocks' parallel regions (LayerNorms, residuals,
dropout in larger models) along the sequence, so each rank stores 1/N of those activations. An all-reduce is
a reduce-scatter followed by an all-gather, so it trades each g for a reduce-scatter of the sequence and
each f for an all-gather, moving the same bytes. As Megatron does, a column-parallel linear keeps only this
rank's part of its input and gathers it again in the backward, so that every activation is split: (6 L + 3)
all-gathers and (4 L + 2) reduce-scatters of B T C e per step, the same 3 cross-entropy all-reduces, plus one
all-reduce of the replicated tensors' gradients, which now see only a part of the sequence each.
"""
import functools
from typing import Callable, NamedTuple

import numpy as np

from common.chapters import import_chapter
from common.driver import Parts, gpt_backward, gpt_forward
from common.layers import (attention_backward, attention_forward, colsum, gelu_backward, gelu_forward,
                           layernorm_backward, layernorm_forward, linear_backward, linear_forward, lm_head_backward,
                           lm_head_forward, rowsum, scatter_add_rows)
from common.moe import LOCAL, Routed, moe_backward, moe_forward
from common.optim import global_norm

sharding = import_chapter("02_tensor_parallel.sharding")     # the shard section, in a file of its own
check_layout, kind, padded_vocab, tp_layout = sharding.check_layout, sharding.kind, sharding.padded_vocab, \
    sharding.tp_layout
shard, shard_tensor, unshard, unshard_tensor = sharding.shard, sharding.shard_tensor, sharding.unshard, \
    sharding.unshard_tensor


# ----------------------------------------------------------------------------- shard: see sharding.py

# ----------------------------------------------------------------------------- forward and backward
# The conjugate operators. Without sequence parallelism a block enters the tensor-parallel region through f
# and leaves it through g; with it, activations outside the region are split along the sequence, so the
# block enters through an all-gather of the sequence and leaves through a reduce-scatter of it.

def copy_to_tp_backward(dx, tp):
    """f: the forward is the identity; the backward sums the partial input gradients of the ranks."""
    return tp.allreduce(dx)


def reduce_from_tp_forward(x, tp):
    """g: the forward sums the ranks' partial outputs; the backward is the identity."""
    return tp.allreduce(x)


def gather_sequence(x, tp):
    """(B,T/N,C) on each rank -> (B,T,C) on every rank: the all-gather of sequence parallelism."""
    B, Tl, C = x.shape
    out = tp.allgather(np.ascontiguousarray(x), np.empty((tp.size, B, Tl, C), dtype=x.dtype))
    return out.transpose(1, 0, 2, 3).reshape(B, tp.size * Tl, C)


def reduce_scatter_sequence(x, tp):
    """(B,T,C) partial sums on each rank -> this rank's (B,T/N,C) slice of their sum."""
    B, T, C = x.shape
    blocks = np.ascontiguousarray(x.reshape(B, tp.size, T // tp.size, C).transpose(1, 0, 2, 3))
    return tp.reduce_scatter(blocks, np.empty((B, T // tp.size, C), dtype=x.dtype))


def enter(x, tp, sp):
    return gather_sequence(x, tp) if sp else x


def enter_backward(dx, tp, sp):
    return reduce_scatter_sequence(dx, tp) if sp else copy_to_tp_backward(dx, tp)


def leave(x, tp, sp):
    return reduce_scatter_sequence(x, tp) if sp else reduce_from_tp_forward(x, tp)


def leave_backward(dx, tp, sp):
    return gather_sequence(dx, tp) if sp else dx


class Attention(NamedTuple):
    """The attention pair a block runs, forward(qkv, n_head, keep_scores) -> (y, cache) and backward(dy, cache) ->
    dqkv: chapter 01's on every position, or context parallelism's ring attention (chapter 06)."""
    forward: Callable
    backward: Callable


ATTENTION = Attention(attention_forward, attention_backward)


# A column-parallel linear's backward needs its whole input for its weight gradient. Under sequence parallelism
# that input is the all-gather of every rank's part of the sequence; as Megatron does, its cache keeps this rank's
# part alone (`c_qkv`, `c_fc`, `c_head`: the input before `enter`) and the backward gathers it again.

def block_forward(x, p, n_head_local, tp, sp, keep_scores=True, attention=ATTENTION, mixture=None):
    """The block with f and g written in. `mixture`, if given, replaces the MLP: mixture(h, p) -> (out, cache), a
    mixture of experts (common/moe.py) whose weights tp does not split, on every position (chapter 06's)."""
    c_qkv, c_ln1 = layernorm_forward(x, p["ln_1.w"], p["ln_1.b"])
    h = enter(c_qkv, tp, sp)                                                  # f, or all-gather the sequence
    h, _ = linear_forward(h, p["attn.c_attn.w"], p["attn.c_attn.b"])         # column-parallel: my heads' q|k|v
    h, c_att = attention.forward(h, n_head_local, keep_scores)               # my heads, on my positions
    h, c_proj = linear_forward(h, p["attn.c_proj.w"], None)                  # row-parallel: a partial sum
    h = leave(h, tp, sp)                                                      # g, or reduce-scatter the sequence
    h += p["attn.c_proj.b"]
    x = x + h
    c_fc, c_ln2 = layernorm_forward(x, p["ln_2.w"], p["ln_2.b"])
    if mixture:
        h, c_moe = mixture(c_fc, p)
        return x + h, (c_ln1, c_qkv, c_att, c_proj, c_ln2, c_moe)
    h, _ = linear_forward(enter(c_fc, tp, sp), p["mlp.c_fc.w"], p["mlp.c_fc.b"])   # column-parallel
    h, c_gelu = gelu_forward(h)
    h, c_mproj = linear_forward(h, p["mlp.c_proj.w"], None)                  # row-parallel
    h = leave(h, tp, sp)
    h += p["mlp.c_proj.b"]
    return x + h, (c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mproj)


def block_backward(dout, cache, p, g, tp, sp, attention=ATTENTION, dloss=1.0):
    if type(cache[-1]) is Routed:       # a mixture of experts: replicated over tp, no f or g
        c_ln1, c_qkv, c_att, c_proj, c_ln2, c_moe = cache
        dh = moe_backward(dout, c_moe, p, g, dloss)
    else:
        c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mproj = cache
        g["mlp.c_proj.b"] += colsum(dout)   # the bias is added after g (or the reduce-scatter): on my positions
        dh = leave_backward(dout, tp, sp)
        dh = linear_backward(dh, c_mproj, p["mlp.c_proj.w"], g["mlp.c_proj.w"], None)
        dh = gelu_backward(dh, c_gelu)
        dh = linear_backward(dh, enter(c_fc, tp, sp), p["mlp.c_fc.w"], g["mlp.c_fc.w"], g["mlp.c_fc.b"])
        dh = enter_backward(dh, tp, sp)
    dx = dout + layernorm_backward(dh, c_ln2, p["ln_2.w"], g["ln_2.w"], g["ln_2.b"])
    g["attn.c_proj.b"] += colsum(dx)
    dh = leave_backward(dx, tp, sp)
    dh = linear_backward(dh, c_proj, p["attn.c_proj.w"], g["attn.c_proj.w"], None)
    dh = attention.backward(dh, c_att)
    dh = linear_backward(dh, enter(c_qkv, tp, sp), p["attn.c_attn.w"], g["attn.c_attn.w"], g["attn.c_attn.b"])
    dh = enter_backward(dh, tp, sp)
    return dx + layernorm_backward(dh, c_ln1, p["ln_1.w"], g["ln_1.w"], g["ln_1.b"])


def positions(T, tp, sp):
    """The sequence positions this rank's activations hold outside the tensor-parallel region."""
    Tl = T // tp.size if sp else T
    return slice(tp.rank * Tl, tp.rank * Tl + Tl) if sp else slice(0, T)


def vocab_embedding_forward(idx, wte, wpe, tp, sp, pos=None):
    """Each rank looks up the tokens of its vocabulary slice (zeros elsewhere), then g (or the sequence
    reduce-scatter) sums the slices. `pos`: the positions of idx's columns in the whole sequence (default
    0..T-1; context parallelism gives each rank its own)."""
    local = idx - tp.rank * wte.shape[0]
    mine = (local >= 0) & (local < wte.shape[0])
    x = wte[np.where(mine, local, 0)]                                         # (B,T,C)
    x[~mine] = 0.0
    x = leave(x, tp, sp)
    where = positions(idx.shape[1], tp, sp)
    x += wpe[where if pos is None else pos[where]]
    return x, (local, mine, pos)


def vocab_embedding_backward(dout, cache, dwte, dwpe, tp, sp):
    local, mine, pos = cache
    where = positions(local.shape[1], tp, sp)
    dwpe[where if pos is None else pos[where]] += dout.sum(axis=0)
    dout = leave_backward(dout, tp, sp)
    scatter_add_rows(dwte, local[mine], dout[mine])                           # only my vocabulary's rows


def vocab_cross_entropy_forward(logits, targets, tp):
    """Mean cross-entropy of the tied head's logits, each rank holding those of its vocabulary slice (B,T,V/N)."""
    Vl = logits.shape[-1]
    lo = tp.rank * Vl
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
    return loss, (e, targets, t, rows)


def vocab_cross_entropy_backward(dloss, cache):
    probs, targets, t, rows = cache
    # loss = mean(log sum exp z - z[target]): dz = (softmax(z) - onehot(target)) / N on my vocabulary slice
    dz = probs
    dz[rows, t[rows]] -= 1.0
    dz *= dloss / dz.shape[0]
    return dz.reshape(*targets.shape, -1)                                     # (B,T,V/N)


def head_forward(x, p, targets, gpt_cfg, tp, sp):
    c_head, c_lnf = layernorm_forward(x, p["ln_f.w"], p["ln_f.b"])
    logits, _ = lm_head_forward(enter(c_head, tp, sp), p["wte"])              # (B,T,V/N)
    Vl = logits.shape[-1]
    logits[..., max(0, min(Vl, gpt_cfg.vocab_size - tp.rank * Vl)):] = -np.inf  # padding rows never win
    if targets is None:
        return logits, None, None
    loss, c_loss = vocab_cross_entropy_forward(logits, targets, tp)
    return logits, loss, (c_lnf, c_head, c_loss)


def head_backward(dloss, cache, p, g, tp, sp):
    c_lnf, c_head, c_loss = cache
    dlogits = vocab_cross_entropy_backward(dloss, c_loss)
    dx = lm_head_backward(dlogits, enter(c_head, tp, sp), p["wte"], g["wte"])   # a partial sum over V
    dx = enter_backward(dx, tp, sp)
    return layernorm_backward(dx, c_lnf, p["ln_f.w"], g["ln_f.w"], g["ln_f.b"])


def tp_parts(tp, sp=False, attention=ATTENTION, pos=None, experts=LOCAL):
    """What common.driver runs on this rank's shards: the vocab-parallel embedding, the blocks with f
    and g written in, the vocab-parallel head and loss (its logits are this rank's (B,T,V_padded/N)). With sp,
    a part's replicated gradients are partial sums until settled over tp (the driver does so before its
    grads_ready hook; without a hook, call sync_replicated_grads once the backward is done). `attention` and
    `pos` (the sequence positions this rank's tokens hold) are what context parallelism changes, `experts`
    (common.moe.Experts) what expert parallelism does."""
    def mixture(gpt_cfg):
        return functools.partial(moe_forward, gpt_cfg=gpt_cfg, experts=experts) if gpt_cfg.n_experts else None

    return Parts(embedding_forward=lambda idx, p: vocab_embedding_forward(idx, p["wte"], p["wpe"], tp, sp, pos),
                 embedding_backward=lambda dx, c, p, g: vocab_embedding_backward(dx, c, g["wte"], g["wpe"], tp, sp),
                 block_forward=lambda x, p, gpt_cfg, keep_scores=True: block_forward(
                     x, p, gpt_cfg.n_head // tp.size, tp, sp, keep_scores, attention, mixture(gpt_cfg)),
                 block_backward=lambda dx, c, p, g, dloss=1.0: block_backward(dx, c, p, g, tp, sp, attention,
                                                                              dloss),
                 head_forward=lambda x, p, targets, gpt_cfg: head_forward(x, p, targets, gpt_cfg, tp, sp),
                 head_backward=lambda dloss, c, p, g: head_backward(dloss, c, p, g, tp, sp),
                 settle=(lambda part, g: sync_replicated_grads(g, tp, part)) if sp else None)


def tp_forward(p, idx, targets, gpt_cfg, tp, sp=False, parts=None):
    """This rank's logits (B,T,V_padded/N) and the loss, equal to the single-core model's on every rank
    (`parts`: tp_parts(tp, sp) as training runs them, common.driver.training_parts)."""
    return gpt_forward(p, idx, targets, gpt_cfg, parts=parts or tp_parts(tp, sp))


def tp_backward(cache, p, g, tp, sp=False, dloss=1.0):
    """Accumulate this rank's gradients; replicated tensors end with the same gradient on every rank."""
    gpt_backward(cache, p, g, dloss)
    if sp:
        sync_replicated_grads(g, tp)


# ----------------------------------------------------------------------------- synchronise gradients
# Without sequence parallelism nothing is needed: every replicated tensor (LayerNorms, row-parallel biases,
# wpe) sees the same, already reduced activations and gradients on every rank, so its gradient is the same
# everywhere (verify.py checks that it is). With it, those tensors act on this rank's part of the sequence
# only, so their gradients are partial sums: one all-reduce of all of them, packed into one buffer.

def sync_replicated_grads(g, tp, part=None):
    """Sum the replicated tensors' gradients over tp in one all-reduce: all of them, or those of one `part`
    of the model (see common.driver.modules)."""
    names = [name for name in g if kind(name) == "replicated" and (part is None or part_of(name) == part)]
    if not names:
        return
    packed = tp.allreduce(np.concatenate([g[name].ravel() for name in names]))
    start = 0
    for name in names:
        g[name][...] = packed[start:start + g[name].size].reshape(g[name].shape)
        start += g[name].size


def part_of(name):
    """The part of the model (common.driver.modules) a tensor belongs to; wte to the embedding."""
    if name.startswith("h."):
        return name[:name.index(".", 2)]
    return "head" if name.startswith("ln_f.") else "embedding"


def counts_once(name, rank):
    """Whether tp rank `rank` counts this tensor in a global sum over the model (e.g. the grad norm): its shard
    of a split tensor, and a replicated tensor on rank 0 only."""
    return rank == 0 or kind(name) != "replicated"


def grad_norm(grads, layout, tp):
    """The single-core model's gradient L2 norm from this rank's flat gradient."""
    return global_norm(grads, layout.ranges(lambda name: counts_once(name, tp.rank)), tp)


# ----------------------------------------------------------------------------- the ledger

def comm_formula(gpt_cfg, rows, itemsize, sp=False, blocks=None, first=True, last=True, microbatches=1,
                 replicated=0, settles=1, recompute="none", seq_len=None, grad_itemsize=None, mixture=False):
    """{kind: (calls, bytes)} one rank passes to tp collectives in a step of `microbatches` micro-batches of
    `rows` rows through `blocks` blocks (default all), the embedding if `first`, the head if `last` (see the
    module docstring). With sp, the `replicated` elements' gradients are all-reduced `settles` times, packed in
    one call each time, and the backward gathers again the part of each column-parallel input a rank kept (two per
    block, one before the head). Full recomputation runs each block's forward twice, and its two g's (or sp's
    all-gather and reduce-scatter pairs) with it. `seq_len`: the positions a row holds here (context
    parallelism's T/cp). `grad_itemsize`: the gradients' bytes per element, where they differ (mixed precision).
    `mixture`: a mixture of experts in place of each MLP (06's), which tp does not split: attention's f and g only."""
    e, T, C, M = itemsize, seq_len or gpt_cfg.block_size, gpt_cfg.n_embd, microbatches
    blocks = gpt_cfg.n_layer if blocks is None else blocks
    forwards, pairs = 2 if recompute == "full" else 1, 1 if mixture else 2
    n = M * ((pairs + pairs * forwards) * blocks + first + last)  # f and g: two each way per block, g after the
    big = rows * T * C * e                                        # embedding, f before the head
    loss = (3 * M, 3 * M * rows * T * e) if last else (0, 0)
    if not sp:
        return {"allreduce": (n + loss[0], n * big + loss[1])}
    gathers = n + M * (pairs * blocks + last)             # the backward gathers the kept inputs again
    out = {"allgather": (gathers, gathers * big), "reduce_scatter": (n, n * big)}
    calls, nbytes = loss[0] + (settles if replicated else 0), loss[1] + settles * replicated * (grad_itemsize or e)
    return {**out, "allreduce": (calls, nbytes)} if calls else out

