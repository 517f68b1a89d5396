"""A GPT-2 style decoder in NumPy, built from the layer pairs of common/layers.py: the transformer block, the
parameters and their initialisation, the model forward and backward, and sampling. The chapters that split
the model run it through common/driver.py, which computes bit for bit what gpt_forward/gpt_backward do.
"""
import math
from typing import NamedTuple

import numpy as np

from common.layers import (attention_backward, attention_forward, cross_entropy_backward,
                           cross_entropy_forward, embedding_backward, embedding_forward, gelu_backward, gelu_forward,
                           layernorm_backward, layernorm_forward, linear_backward, linear_forward, lm_head_backward,
                           lm_head_forward)
from common.moe import Routed, moe_backward, moe_forward, moe_shapes
from common.params import Layout, sub
from common.precision import autocast

# ----------------------------------------------------------------------------- the transformer block

def block_forward(x, p, gpt_cfg, keep_scores=True):
    """x + attn(ln_1(x)), then + mlp(ln_2(.)), or a mixture of experts (common/moe.py) given --n-experts; `p` holds
    this block's views ("ln_1.w", ...). keep_scores False: attention's probabilities are left out of the cache
    and recomputed in the backward."""
    h, c_ln1 = layernorm_forward(x, p["ln_1.w"], p["ln_1.b"])
    h, c_qkv = linear_forward(h, p["attn.c_attn.w"], p["attn.c_attn.b"])   # (B,T,3C)
    h, c_att = attention_forward(h, gpt_cfg.n_head, keep_scores)
    h, c_proj = linear_forward(h, p["attn.c_proj.w"], p["attn.c_proj.b"])
    x = x + h
    h, c_ln2 = layernorm_forward(x, p["ln_2.w"], p["ln_2.b"])
    if gpt_cfg.n_experts:
        h, c_moe = moe_forward(h, p, gpt_cfg)
        return x + h, (c_ln1, c_qkv, c_att, c_proj, c_ln2, c_moe)
    h, c_fc = linear_forward(h, p["mlp.c_fc.w"], p["mlp.c_fc.b"])          # (B,T,4C)
    h, c_gelu = gelu_forward(h)
    h, c_mproj = linear_forward(h, p["mlp.c_proj.w"], p["mlp.c_proj.b"])
    return x + h, (c_ln1, c_qkv, c_att, c_proj, c_ln2, c_fc, c_gelu, c_mproj)


def block_backward(dout, cache, p, g, dloss=1.0):
    """dloss: the seed of the loss, which a mixture of experts' balance term adds to (a dense block adds none)."""
    if type(cache[-1]) is Routed:
        c_ln1, c_qkv, c_att, c_proj, c_ln2, c_moe = cache
        dh = moe_backward(dout, c_moe, p, g, dloss)
    else:
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

def block_shapes(C, n_experts=0):
    """The parameters of one transformer block of width C (with experts in place of its MLP), in buffer order."""
    return [("ln_1.w", (C,)), ("ln_1.b", (C,)),
            ("attn.c_attn.w", (C, 3 * C)), ("attn.c_attn.b", (3 * C,)),
            ("attn.c_proj.w", (C, C)), ("attn.c_proj.b", (C,)),
            ("ln_2.w", (C,)), ("ln_2.b", (C,))] + (moe_shapes(C, n_experts) if n_experts else [
            ("mlp.c_fc.w", (C, 4 * C)), ("mlp.c_fc.b", (4 * C,)),
            ("mlp.c_proj.w", (4 * C, C)), ("mlp.c_proj.b", (C,))])


def param_shapes(gpt_cfg):
    """Every parameter's name and shape, in the order of the flat buffer. Weights are (in, out)."""
    C, V, T = gpt_cfg.n_embd, gpt_cfg.vocab_size, gpt_cfg.block_size
    shapes = [("wte", (V, C)), ("wpe", (T, C))]
    for i in range(gpt_cfg.n_layer):
        shapes += [(f"h.{i}.{name}", shape) for name, shape in block_shapes(C, gpt_cfg.n_experts)]
    return shapes + [("ln_f.w", (C,)), ("ln_f.b", (C,))]


def gpt_layout(gpt_cfg):
    return Layout(param_shapes(gpt_cfg))


def init_params(gpt_cfg, seed, dtype):
    """nanoGPT's initialisation, drawn in float64 from `seed` so every dtype and layout starts identical:
    N(0, 0.02) for weights (the router's and the experts' too) and embeddings, residual projections scaled by
    1/sqrt(2 n_layer), zero biases, unit LayerNorm gains. Returns the flat parameter buffer."""
    layout = gpt_layout(gpt_cfg)
    rng = np.random.default_rng(seed)
    flat = np.zeros(layout.size, dtype=dtype)
    views = layout.views(flat)
    for name, shape in layout.shapes.items():
        if name.endswith(("ln_1.w", "ln_2.w", "ln_f.w")):
            views[name][...] = 1.0
        elif not name.endswith(".b"):
            std = 0.02 / math.sqrt(2 * gpt_cfg.n_layer) if name.endswith("c_proj.w") else 0.02
            views[name][...] = rng.normal(0.0, std, size=shape)
    return flat


def head_forward(x, p, targets):
    """The final LayerNorm, the tied LM head's logits (B,T,V) and, given targets, their mean cross-entropy."""
    x, c_lnf = layernorm_forward(x, p["ln_f.w"], p["ln_f.b"])
    logits, c_head = lm_head_forward(x, p["wte"])
    if targets is None:
        return logits, None, None
    loss, c_loss = cross_entropy_forward(logits, targets)
    return logits, loss, (c_lnf, c_head, c_loss)


def head_backward(dloss, cache, p, g):
    c_lnf, c_head, c_loss = cache
    dlogits = cross_entropy_backward(dloss, c_loss)
    dx = lm_head_backward(dlogits, c_head, p["wte"], g["wte"])
    return layernorm_backward(dx, c_lnf, p["ln_f.w"], g["ln_f.w"], g["ln_f.b"])


# ----------------------------------------------------------------------------- forward and backward
# recompute: "none" keeps every block's cache from its forward to its backward; "selective" leaves attention's
# (heads, T, T) probabilities out and recomputes them in the backward; "full" keeps only each block's input
# and runs the block's forward again at the start of its backward.

class Rerun(NamedTuple):
    """What a block keeps under full recomputation: its input, from which the backward runs its forward again
    (and a mixture of experts' Routing, which the step reports)."""
    x: object
    gpt_cfg: object
    routing: object = None


def routing(cache):
    """The Routing a block's forward reported in its cache (None for a dense block)."""
    return cache.routing if type(cache) is Rerun else cache[-1].routing if type(cache[-1]) is Routed else None


def objective(loss, cache, gpt_cfg):
    """What training minimises: the loss, plus with experts a times the blocks' balance losses (common/moe.py)."""
    return loss + gpt_cfg.aux_loss_coef * sum(r.aux for r in map(routing, cache[1]) if r is not None)


def gpt_forward(p, idx, targets, gpt_cfg, recompute="none"):
    """Logits (B,T,V) and, when targets are given, the mean cross-entropy loss; plus the cache for backward.
    Given 16-bit weights, in mixed precision: each part computes in float32 and stores in 16 bits."""
    mp = autocast(p["wte"].dtype)           # mp(f) is f itself unless the weights have 16 bits
    x, c_emb = mp(embedding_forward)(idx, p["wte"], p["wpe"])
    c_blocks = []
    for i in range(gpt_cfg.n_layer):
        x_in = x
        x, c = mp(block_forward)(x, sub(p, f"h.{i}."), gpt_cfg, keep_scores=recompute != "selective")
        c_blocks.append(Rerun(x_in, gpt_cfg, routing(c)) if recompute == "full" else c)
    logits, loss, c_head = mp(head_forward)(x, p, targets)
    return logits, loss, (c_emb, c_blocks, c_head)


def gpt_backward(cache, p, g, dloss=1.0):
    """Accumulate d(dloss * objective)/d(param) into the gradient views `g`: the objective is the loss, plus with
    experts every block's balance term times --aux-loss-coef (objective())."""
    c_emb, c_blocks, c_head = cache
    mp = autocast(p["wte"].dtype)           # mp(f, grads=k): f's last k arguments are gradients it adds into
    dx = mp(head_backward, grads=1)(dloss, c_head, p, g)
    for i in reversed(range(len(c_blocks))):
        c = c_blocks[i]
        if type(c) is Rerun:                # the same forward on the same input: bit for bit the same cache
            _, c = mp(block_forward)(c.x, sub(p, f"h.{i}."), c.gpt_cfg)
        dx = mp(block_backward, grads=1)(dx, c, sub(p, f"h.{i}."), sub(g, f"h.{i}."), dloss=dloss)
    mp(embedding_backward, grads=2)(dx, c_emb, g["wte"], g["wpe"])  # wte's gradient also has the LM head's part


def generate(p, gpt_cfg, idx, max_new_tokens, rng, temperature=1.0, top_k=None):
    """Append `max_new_tokens` sampled tokens to idx (B,T), cropping the context to block_size."""
    for _ in range(max_new_tokens):
        logits, _, _ = gpt_forward(p, idx[:, -gpt_cfg.block_size:], None, gpt_cfg)
        logits = logits[:, -1, :].astype(np.float64) / temperature          # (B,V)
        if top_k is not None and top_k < logits.shape[-1]:
            kth = np.partition(logits, -top_k, axis=-1)[:, -top_k, None]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        nxt = np.array([[rng.choice(probs.shape[-1], p=row)] for row in probs])
        idx = np.concatenate([idx, nxt], axis=1)
    return idx
