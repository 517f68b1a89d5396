"""Zero-bubble's B/W split (Qi et al., arXiv:2401.10241): a backward computes the input gradient, which the
stage before waits for (B), and the weight gradients, which nothing needs until the optimizer step (W). The
zb-h1 schedule runs B at once and W later, in what would be idle time.

Every layer with weights in common/layers.py computes its backward as two functions, `..._input_grad` and
`..._weight_grads`; here the block and the head call the first at once and queue the second, with the arrays
it will read, as a `Later`. The common.driver runs these through `Parts.deferring`: stage_backward(...,
weights=queue) is B, stage_weights(queue) is W, and the two add up bit for bit to the whole backward
(tests/test_pipeline.py). The blocks are chapter 01's or, with the operators of chapter 02 (`enter`,
`enter_backward` and `leave_backward`: f and g, or sequence parallelism's all-gather and reduce-scatter) and its
vocab-parallel loss, chapter 02's; `attention`, the attention's backward, is context parallelism's ring's in 06.
"""
from dataclasses import replace
from typing import Callable, NamedTuple

import numpy as np

from common.layers import (attention_backward, colsum, cross_entropy_backward, gelu_backward, layernorm_input_grad,
                           layernorm_weight_grads, linear_input_grad, linear_weight_grads, lm_head_input_grad,
                           lm_head_weight_grads)
from common.moe import Routed, moe_backward


class Later(NamedTuple):
    """A weight-gradient term W runs: fn(*inputs, *grads). `inputs` are what waiting for it keeps alive, `grads`
    the gradient buffers it adds into."""
    fn: Callable
    inputs: tuple
    grads: tuple

    def __call__(self):
        self.fn(*self.inputs, *self.grads)


def queued_operands(queue):
    """The arrays the terms in `queue` will read, not the gradients they add to: what waiting for W holds."""
    return [item.inputs for item in queue if isinstance(item, Later)]


def deferred_bytes(gpt_cfg, rows, blocks, last=True, tp_size=1, sp=False, itemsize=4, cp_size=1, first=False):
    """What waiting weight gradients hold, between a backward that deferred them (B) and their computation (W):
    what W reads. Of the cache of common.memory.activation_bytes, per block and row, the two LayerNorms' xhat
    (2 Tl C) and the inputs of the four linears (2 Tq C + 5 Tq C / tp); the head's ln_f xhat and output, and its
    probabilities, which the loss's backward turns into the logits' gradient in place. And the output gradients
    W multiplies them with, per block and row: the block's output gradient, the two LayerNorms' and the
    attention projection's (4 Tl C), c_fc's and c_attn's (7 Tq C / tp), and under sp the two gathered ones that
    enter the row-parallel linears (2 Tq C); ln_f's on the last stage and the embedding's on the first (Tl C)."""
    T, C, V = gpt_cfg.block_size, gpt_cfg.n_embd, gpt_cfg.vocab_size
    t = tp_size
    Tq = T // cp_size
    Tl = Tq // t if sp else Tq
    cached = 2 * Tl * C + 2 * Tq * C + 5 * Tq * C // t
    gradients = 4 * Tl * C + (2 * Tq * C if sp else 0) + 7 * Tq * C // t
    head = (Tl * C + Tq * C + Tq * -(-V // t)) if last else 0
    ends = (last + first) * Tl * C
    return rows * (blocks * (cached + gradients) + head + ends) * itemsize


def same(x):
    return x


def bias_grad(dout, db):
    db += colsum(dout)


def added(*arrays):
    """The first half of `arrays` added into the second (gradients computed in B, added in W)."""
    n = len(arrays) // 2
    for done, into in zip(arrays[:n], arrays[n:]):
        into += done


def block_input_grad(dout, cache, p, g, later, enter=same, enter_backward=same, leave_backward=same,
                     attention=attention_backward, dloss=1.0):
    """B of a transformer block (01's block_backward, or 02's with its operators: `enter` gathers again what
    sequence parallelism's cache keeps of a column-parallel input): its input gradient, every weight-gradient
    term passed to later(fn, inputs, *grads). A mixture of experts runs its whole backward in B (its experts'
    may be on other ranks, reached by all-to-all, inside it); the gradients it computes wait to be added in W."""
    if type(cache[-1]) is Routed:
        c_ln1, c_qkv, c_att, c_proj, c_ln2, c_moe = cache
        names = [name for name in g if name.startswith("mlp.")]
        done = {name: np.zeros_like(p[name]) for name in names}
        dh = moe_backward(dout, c_moe, p, done, dloss)
        later(added, tuple(done[name] for name in names), *(g[name] for name in names))
        return block_input_grad_attention(dout, dh, (c_ln1, c_qkv, c_att, c_proj, c_ln2), p, g, later, enter,
                                          enter_backward, leave_backward, attention)
    c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mproj = cache
    later(bias_grad, (dout,), g["mlp.c_proj.b"])        # row-parallel biases act after g: on the output gradient
    dh = leave_backward(dout)
    later(linear_weight_grads, (dh, c_mproj), g["mlp.c_proj.w"], None)
    dh = gelu_backward(linear_input_grad(dh, p["mlp.c_proj.w"]), c_gelu)
    later(linear_weight_grads, (dh, enter(c_fc)), g["mlp.c_fc.w"], g["mlp.c_fc.b"])
    dh = enter_backward(linear_input_grad(dh, p["mlp.c_fc.w"]))
    return block_input_grad_attention(dout, dh, (c_ln1, c_qkv, c_att, c_proj, c_ln2), p, g, later, enter,
                                      enter_backward, leave_backward, attention)


def block_input_grad_attention(dout, dh, cache, p, g, later, enter, enter_backward, leave_backward, attention):
    """B of the block from ln_2 down, given the gradient `dh` of ln_2's output."""
    c_ln1, c_qkv, c_att, c_proj, c_ln2 = cache
    later(layernorm_weight_grads, (dh, c_ln2[0]), g["ln_2.w"], g["ln_2.b"])
    dx = dout + layernorm_input_grad(dh, c_ln2, p["ln_2.w"])
    later(bias_grad, (dx,), g["attn.c_proj.b"])
    dh = leave_backward(dx)
    later(linear_weight_grads, (dh, c_proj), g["attn.c_proj.w"], None)
    dh = attention(linear_input_grad(dh, p["attn.c_proj.w"]), c_att)
    later(linear_weight_grads, (dh, enter(c_qkv)), g["attn.c_attn.w"], g["attn.c_attn.b"])
    dh = enter_backward(linear_input_grad(dh, p["attn.c_attn.w"]))
    later(layernorm_weight_grads, (dh, c_ln1[0]), g["ln_1.w"], g["ln_1.b"])
    return dx + layernorm_input_grad(dh, c_ln1, p["ln_1.w"])


def head_input_grad(dloss, cache, p, g, later, enter=same, enter_backward=same,
                    loss_backward=cross_entropy_backward):
    """B of the head: the loss's and the tied LM head's backward, then the final LayerNorm's."""
    c_lnf, c_head, c_loss = cache
    dlogits = loss_backward(dloss, c_loss)
    later(lm_head_weight_grads, (dlogits, enter(c_head)), g["wte"])
    dx = enter_backward(lm_head_input_grad(dlogits, p["wte"]))
    later(layernorm_weight_grads, (dx, c_lnf[0]), g["ln_f.w"], g["ln_f.b"])
    return layernorm_input_grad(dx, c_lnf, p["ln_f.w"])


def deferring(parts, enter=same, enter_backward=same, leave_backward=same, attention=attention_backward,
              loss_backward=cross_entropy_backward):
    """`parts` (a common.driver.Parts) able to defer their weight gradients: their `deferring(queue)` gives the
    same parts with B for backwards, W's terms queued in `queue` (the embedding's backward, all weight
    gradient, queued whole)."""
    def split(queue):
        def later(fn, inputs, *grads):
            queue.append(Later(fn, inputs, grads))

        return replace(
            parts,
            block_backward=lambda dx, c, p, g, dloss=1.0: block_input_grad(dx, c, p, g, later, enter,
                                                                           enter_backward, leave_backward, attention,
                                                                           dloss),
            head_backward=lambda dloss, c, p, g: head_input_grad(dloss, c, p, g, later, enter, enter_backward,
                                                                 loss_backward),
            embedding_backward=lambda dx, c, p, g: later(parts.embedding_backward, (dx, c, p), g))

    return replace(parts, deferring=split)
