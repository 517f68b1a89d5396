"""A GPT-2 style decoder in NumPy, built from the layer pairs of common/layers.py: the transformer block, the
parameters and their initialisation, and the driver that runs any slice of the model forward and backward.
"""
import contextlib
import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import numpy as np

from common.layers import (Deferred, attention_backward, attention_forward, cross_entropy_backward,
                           cross_entropy_forward, embedding_backward, embedding_forward, gelu_backward, gelu_forward,
                           layernorm_backward, layernorm_forward, linear_backward, linear_forward, lm_head_backward,
                           lm_head_forward)
from common.params import Layout, sub

# ----------------------------------------------------------------------------- the transformer block

def block_forward(x, p, n_head, keep_scores=True):
    """x + attn(ln_1(x)), then + mlp(ln_2(.)); `p` holds this block's views ("ln_1.w", ...). keep_scores False:
    attention's probabilities are left out of the cache and recomputed in the backward."""
    h, c_ln1 = layernorm_forward(x, p["ln_1.w"], p["ln_1.b"])
    h, c_qkv = linear_forward(h, p["attn.c_attn.w"], p["attn.c_attn.b"])   # (B,T,3C)
    h, c_att = attention_forward(h, n_head, keep_scores)
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


def param_shapes(gpt_cfg):
    """Every parameter's name and shape, in the order of the flat buffer. Weights are (in, out)."""
    C, V, T = gpt_cfg.n_embd, gpt_cfg.vocab_size, gpt_cfg.block_size
    shapes = [("wte", (V, C)), ("wpe", (T, C))]
    for i in range(gpt_cfg.n_layer):
        shapes += [(f"h.{i}.{name}", shape) for name, shape in block_shapes(C)]
    return shapes + [("ln_f.w", (C,)), ("ln_f.b", (C,))]


def gpt_layout(gpt_cfg):
    return Layout(param_shapes(gpt_cfg))


def init_params(gpt_cfg, seed, dtype):
    """nanoGPT's initialisation, drawn in float64 from `seed` so every dtype and layout starts identical:
    N(0, 0.02) for weights and embeddings, residual projections scaled by 1/sqrt(2 n_layer), zero biases,
    unit LayerNorm gains. Returns the flat parameter buffer."""
    layout = gpt_layout(gpt_cfg)
    rng = np.random.default_rng(seed)
    flat = np.zeros(layout.size, dtype=dtype)
    views = layout.views(flat)
    for name, shape in layout.shapes.items():
        if name.endswith(("ln_1.w", "ln_2.w", "ln_f.w")):
            views[name][...] = 1.0
        elif len(shape) == 2:
            std = 0.02 / math.sqrt(2 * gpt_cfg.n_layer) if name.endswith("c_proj.w") else 0.02
            views[name][...] = rng.normal(0.0, std, size=shape)
    return flat


def modules(gpt_cfg):
    """The parameters each part of gpt_forward reads, in the order it runs them: the embedding, every block,
    and the head (the final LayerNorm and the tied wte). The backward runs them in reverse."""
    block = [name for name, _ in block_shapes(gpt_cfg.n_embd)]
    return {"embedding": ("wte", "wpe"),
            **{f"h.{i}": tuple(f"h.{i}.{name}" for name in block) for i in range(gpt_cfg.n_layer)},
            "head": ("ln_f.w", "ln_f.b", "wte")}


def _no_hook(module):
    return contextlib.nullcontext()


def head_forward(x, p, targets, gpt_cfg):
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


@dataclass(frozen=True)
class Parts:
    """The functions the driver runs for each part of the model; tensor parallelism supplies its own.
    settle(part, g), if given, makes a part's gradients final (e.g. sums partial sums over ranks) before the
    driver announces them through its grads_ready hook.

    recompute: "none" keeps every block's cache from its forward to its backward; "selective" leaves attention's
    (heads, T, T) probabilities out and recomputes them in the backward; "full" keeps only each block's input
    and runs the block's forward again at the start of its backward. hold(cache), if given, is told of every
    cache the driver keeps, and of each block cache made (and dropped) under full recomputation: how the bytes
    of activations are measured (common.memory.Transient.hold)."""
    embedding_forward: Callable     # (idx, p) -> (x, cache)
    embedding_backward: Callable    # (dx, cache, p, g) -> None
    block_forward: Callable         # (x, p of the block, gpt_cfg, keep_scores) -> (x, cache)
    block_backward: Callable        # (dx, cache, p, g of the block) -> dx
    head_forward: Callable          # (x, p, targets, gpt_cfg) -> (logits, loss, cache)
    head_backward: Callable         # (dloss, cache, p, g) -> dx
    settle: Callable = None         # (part, g) -> None
    recompute: str = "none"
    hold: Callable = None           # (cache) -> None


def training_parts(parts, recompute="none", held=None):
    """`parts` recomputing as asked, with every cache they keep counted as "activations" in `held` (a
    common.memory.Transient), if given."""
    return replace(parts, recompute=recompute, hold=functools.partial(held.hold, "activations") if held else None)


def evaluation_parts(parts):
    """`parts` for a forward no backward follows (evaluation): each block's cache is dropped as the block ends,
    as full recomputation's forward drops it, so evaluating holds no more than training; nothing is held."""
    return replace(parts, recompute="full", hold=None)


class Rerun(NamedTuple):
    """What a block keeps under full recomputation: its input, from which the backward runs its forward again."""
    x: object
    gpt_cfg: object


# module-level names are looked up at call time, so a test that patches one of them reaches the driver
SINGLE = Parts(embedding_forward=lambda idx, p: embedding_forward(idx, p["wte"], p["wpe"]),
               embedding_backward=lambda dx, cache, p, g: embedding_backward(dx, cache, g["wte"], g["wpe"]),
               block_forward=lambda x, p, gpt_cfg, keep_scores=True: block_forward(x, p, gpt_cfg.n_head,
                                                                                   keep_scores),
               block_backward=lambda dx, cache, p, g: block_backward(dx, cache, p, g),
               head_forward=lambda x, p, targets, gpt_cfg: head_forward(x, p, targets, gpt_cfg),
               head_backward=lambda dloss, cache, p, g: head_backward(dloss, cache, p, g))


def stage_forward(p, inp, targets, gpt_cfg, layers, first=True, last=True, using=_no_hook, parts=SINGLE):
    """Run the part of the model a pipeline stage holds: the embedding if `first` (inp: token ids (B,T)),
    blocks `layers` (else inp: activations (B,T,C)), and the head if `last`. Returns (out, loss, cache):
    the logits and, given targets, the mean cross-entropy on the last stage; activations elsewhere.
    Each part runs inside `with using(part)` (see `modules`): a hook for ZeRO-3 to gather that part's weights
    into `p` just before it runs and free them right after. `parts` says how each part computes."""
    x, c_emb = inp, None
    if first:
        with using("embedding"):
            x, c_emb = parts.embedding_forward(inp, p)
    c_blocks = []
    for i in layers:
        with using(f"h.{i}"):
            x, c = _block_forward(parts, x, sub(p, f"h.{i}."), gpt_cfg)
        c_blocks.append(c)
    if not last:
        return x, None, _kept(parts, (parts, first, last, layers, c_emb, c_blocks, None))
    with using("head"):
        logits, loss, c_head = parts.head_forward(x, p, targets, gpt_cfg)
    if targets is None:
        return logits, None, None
    return logits, loss, _kept(parts, (parts, first, last, layers, c_emb, c_blocks, c_head))


def _kept(parts, cache):
    if parts.hold:
        parts.hold(cache)
    return cache


def _block_forward(parts, x, p, gpt_cfg):
    """A block's output and what its backward needs: its cache, or under full recomputation its input alone."""
    out, cache = parts.block_forward(x, p, gpt_cfg, parts.recompute != "selective")
    if parts.recompute != "full":
        return out, cache
    _kept(parts, cache)                                     # alive until this returns: the forward's working set
    return out, Rerun(x, gpt_cfg)


def _block_backward(parts, dx, cache, p, g):
    if parts.recompute == "full":                           # the same forward on the same input: the same cache
        _, cache = parts.block_forward(cache.x, p, cache.gpt_cfg, True)
        _kept(parts, cache)
    return parts.block_backward(dx, cache, p, g)


def stage_backward(cache, p, g, dout, grads_ready=None, using=_no_hook, weights=None):
    """Accumulate the parameter gradients of a stage_forward into the views `g`; dout is d(loss)'s scale (a
    number) on the last stage, the gradient of the stage's output elsewhere. Returns the gradient of the
    stage's input activations (None on the first stage). grads_ready(name), if given, is called as soon as
    the gradients of `name` and of every tensor after it in the layout are final (the driver settles them
    first): a hook for starting their communication while the backward goes on. `using` is stage_forward's,
    here also the moment ZeRO-2/3 can put a part's gradient buffers into `g`.

    Given a list `weights`, the weight gradients are not computed: their terms are queued in it (with the
    points where grads_ready would be called), and stage_weights(weights, ...) computes them later; the
    input gradient is computed now, as always. The embedding's backward, all weight gradient, is queued whole."""
    parts, first, last, layers, c_emb, c_blocks, c_head = cache
    gw = g if weights is None else {name: Deferred(view, weights) for name, view in g.items()}

    def ready(part, name):
        if weights is not None:
            weights.append((part, name))
        elif grads_ready:
            if parts.settle:
                parts.settle(part, g)
            grads_ready(name)

    dx = dout
    if last:
        with using("head"):
            dx = parts.head_backward(dout, c_head, p, gw)
        ready("head", "ln_f.w")
    for i, c in zip(reversed(layers), reversed(c_blocks)):
        with using(f"h.{i}"):
            dx = _block_backward(parts, dx, c, sub(p, f"h.{i}."), sub(gw, f"h.{i}."))
        ready(f"h.{i}", f"h.{i}.ln_1.w")
    if not first:
        return dx
    with using("embedding"):
        if weights is None:
            parts.embedding_backward(dx, c_emb, p, g)           # wte's gradient also has the LM head's part
        else:
            weights.append(functools.partial(parts.embedding_backward, dx, c_emb, p, g))
    ready("embedding", "wte")
    return None


def stage_weights(weights, g, parts, grads_ready=None):
    """Run what stage_backward(..., weights=weights) queued: every weight-gradient term, in order, each part's
    followed by its grads_ready call (if given; its settle first) as stage_backward would make it."""
    for item in weights:
        if callable(item):
            item()
        elif grads_ready:
            part, name = item
            if parts.settle:
                parts.settle(part, g)
            grads_ready(name)
    weights.clear()


def gpt_forward(p, idx, targets, gpt_cfg, using=_no_hook, parts=SINGLE):
    """Logits (B,T,V) and, when targets are given, the mean cross-entropy loss; plus the cache for backward."""
    return stage_forward(p, idx, targets, gpt_cfg, range(gpt_cfg.n_layer), using=using, parts=parts)


def gpt_backward(cache, p, g, dloss=1.0, grads_ready=None, using=_no_hook):
    """Accumulate d(dloss * loss)/d(param) into the gradient views `g` (hooks: see stage_backward)."""
    stage_backward(cache, p, g, dloss, grads_ready, using)


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
