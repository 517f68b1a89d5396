"""The model driver: chapter 01's forward and backward (common/model.py) with the seams the parallel chapters
plug into, so no chapter restates the model. Run with none of them, it computes bit for bit what gpt_forward
and gpt_backward compute (tests/test_driver.py). The seams, each with the chapter that brings it:

    parts         02 the layer functions of each part of the model: tensor parallelism supplies its own
    settle        02 make a part's gradients final (sequence parallelism's partial sums) before grads_ready
    grads_ready   03 called as soon as a part's gradients are final: data parallelism starts reducing them
    using         04 entered around each part: ZeRO-3 gathers its weights just before and frees them after
    layers, first, last   05 the slice of the model a pipeline stage runs
    weights       05 zero-bubble's B/W split: the weight gradients queued, computed later (parts.deferring)
    hold       02-06 cache accounting: every cache kept is told to a common.memory.Transient, so the bytes of
                     activations are measured, per stage with micro-batches in flight in 05 (01 measures its
                     one cache itself)
"""
import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Callable

from common.layers import embedding_backward, embedding_forward
from common.model import Rerun, block_backward, block_forward, block_shapes, head_backward, head_forward, routing
from common.params import sub
from common.precision import mixed, storage


def no_hook(part):
    return contextlib.nullcontext()


def modules(gpt_cfg):
    """The parameters each part of the model reads, in the order the forward runs them: the embedding, every
    block, and the head (the final LayerNorm and the tied wte). The backward runs them in reverse."""
    block = [name for name, _ in block_shapes(gpt_cfg.n_embd, gpt_cfg.n_experts)]
    return {"embedding": ("wte", "wpe"),
            **{f"h.{i}": tuple(f"h.{i}.{name}" for name in block) for i in range(gpt_cfg.n_layer)},
            "head": ("ln_f.w", "ln_f.b", "wte")}


@dataclass(frozen=True)
class Parts:
    """The functions the driver runs for each part of the model, and how it runs them.

    settle(part, g), if given, makes a part's gradients final before the driver announces them through its
    grads_ready hook. recompute: as common/model.py's ("none", "selective" or "full"). hold(cache), if given,
    is told of every cache the driver keeps. deferring(queue), if given, returns these parts with backwards
    that compute input gradients only and queue their weight gradients in `queue` (05's zero-bubble)."""
    embedding_forward: Callable     # (idx, p) -> (x, cache)
    embedding_backward: Callable    # (dx, cache, p, g) -> None
    block_forward: Callable         # (x, p of the block, gpt_cfg, keep_scores) -> (x, cache)
    block_backward: Callable        # (dx, cache, p, g of the block, dloss=) -> dx (dloss: the loss's seed)
    head_forward: Callable          # (x, p, targets, gpt_cfg) -> (logits, loss, cache)
    head_backward: Callable         # (dloss, cache, p, g) -> dx
    settle: Callable = None         # (part, g) -> None
    recompute: str = "none"
    hold: Callable = None           # (cache) -> None
    deferring: Callable = None      # (queue) -> Parts


def training_parts(parts, recompute="none", held=None):
    """`parts` recomputing as asked, with every cache they keep counted as "activations" in `held` (a
    common.memory.Transient), if given."""
    return replace(parts, recompute=recompute, hold=functools.partial(held.hold, "activations") if held else None)


def evaluation_parts(parts):
    """`parts` for a forward no backward follows (evaluation): each block keeps only its input, as under full
    recomputation, and nothing is held."""
    return replace(parts, recompute="full", hold=None)


def for_training(parts, train_cfg, held):
    """(parts as training runs them, as evaluation runs them), in the run's precision (common.precision.mixed)."""
    training = training_parts(mixed(parts, storage(train_cfg)), train_cfg.recompute, held)
    return training, evaluation_parts(training)


# module-level names are looked up at call time, so a test that patches one of them reaches the driver
SINGLE = Parts(embedding_forward=lambda idx, p: embedding_forward(idx, p["wte"], p["wpe"]),
               embedding_backward=lambda dx, cache, p, g: embedding_backward(dx, cache, g["wte"], g["wpe"]),
               block_forward=lambda x, p, gpt_cfg, keep_scores=True: block_forward(x, p, gpt_cfg, keep_scores),
               block_backward=lambda dx, cache, p, g, dloss=1.0: block_backward(dx, cache, p, g, dloss),
               head_forward=lambda x, p, targets, gpt_cfg: head_forward(x, p, targets),
               head_backward=lambda dloss, cache, p, g: head_backward(dloss, cache, p, g))


def stage_forward(p, inp, targets, gpt_cfg, layers, first=True, last=True, using=no_hook, parts=SINGLE):
    """Run the part of the model a pipeline stage holds: the embedding if `first` (inp: token ids (B,T)),
    blocks `layers` (else inp: activations (B,T,C)), and the head if `last`. Returns (out, loss, cache):
    the logits and, given targets, the mean cross-entropy on the last stage; activations elsewhere.
    Each part runs inside `with using(part)` (see `modules`)."""
    x, c_emb = inp, None
    if first:
        with using("embedding"):
            x, c_emb = parts.embedding_forward(inp, p)
    c_blocks = []
    for i in layers:
        with using(f"h.{i}"):
            out, c = parts.block_forward(x, sub(p, f"h.{i}."), gpt_cfg, parts.recompute != "selective")
        c_blocks.append(Rerun(x, gpt_cfg, routing(c)) if parts.recompute == "full" else c)
        x = out
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


def stage_backward(cache, p, g, dout, grads_ready=None, using=no_hook, weights=None, dloss=None):
    """Accumulate the parameter gradients of a stage_forward into the views `g`; dout is d(loss)'s scale (a
    number) on the last stage, the gradient of the stage's output elsewhere, where `dloss` gives that scale to
    the blocks with experts, whose balance terms join the loss. Returns the gradient of the stage's input
    activations (None on the first stage). grads_ready(name), if given, is called as soon as
    the gradients of `name` and of every tensor after it in the layout are final (settled first). `using` is
    stage_forward's, here also the moment ZeRO-2/3 can put a part's gradient buffers into `g`.

    Given a list `weights`, the backward runs through parts.deferring(weights): the input gradients are
    computed now, the weight-gradient terms queued in `weights` with the points where grads_ready would be
    called, and stage_weights(weights, ...) computes them later."""
    parts, first, last, layers, c_emb, c_blocks, c_head = cache
    run = parts if weights is None else parts.deferring(weights)

    def ready(part, name):
        if weights is not None:
            weights.append((part, name))
        elif grads_ready:
            if parts.settle:
                parts.settle(part, g)
            grads_ready(name)

    dx, dloss = dout, dout if last else dloss
    if last:
        with using("head"):
            dx = run.head_backward(dout, c_head, p, g)
        ready("head", "ln_f.w")
    for i, c in zip(reversed(layers), reversed(c_blocks)):
        with using(f"h.{i}"):               # no name outlives it holding the part's weights (ZeRO-3 frees them)
            if type(c) is Rerun:            # the same forward on the same input: bit for bit the same cache
                _, c = parts.block_forward(c.x, sub(p, f"h.{i}."), c.gpt_cfg, True)
            dx = run.block_backward(dx, c, sub(p, f"h.{i}."), sub(g, f"h.{i}."), dloss=dloss)
        ready(f"h.{i}", f"h.{i}.ln_1.w")
    if not first:
        return dx
    with using("embedding"):
        run.embedding_backward(dx, c_emb, p, g)                 # wte's gradient also has the LM head's part
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


def gpt_forward(p, idx, targets, gpt_cfg, using=no_hook, parts=SINGLE):
    """common.model.gpt_forward through the driver: every block, first and last at once."""
    return stage_forward(p, idx, targets, gpt_cfg, range(gpt_cfg.n_layer), using=using, parts=parts)


def gpt_backward(cache, p, g, dloss=1.0, grads_ready=None, using=no_hook):
    """common.model.gpt_backward through the driver (hooks: see stage_backward)."""
    stage_backward(cache, p, g, dloss, grads_ready, using)
