"""Mixed precision (Micikevicius et al., 2018): weights, activations and gradients stored in 16 bits, the
arithmetic done in float32, and a float32 master copy of the weights that the optimizer updates.

    fp32   everything in --dtype (float32 to train, float64 to check): the reference
    bf16   bfloat16 (ml_dtypes): float32's 8 exponent bits, so its range, and 8 significand bits: unit roundoff
           u = 2^-8. No loss scaling.
    fp16   IEEE half precision: 11 significand bits (u = 2^-11) but 5 exponent bits. Magnitudes below 6.1e-5
           lose bits and below 6e-8 become zero, where much of a large model's gradient lies, so the loss is
           multiplied by a large scale before the backward and the gradients divided by it after (dynamic loss
           scaling: common/optim.py's LossScaler).

Where a value is rounded. NumPy has no 16-bit matrix multiply (and ml_dtypes' bfloat16 arithmetic runs element
by element in software), so each part of the model (the embedding, a block, the head) computes in float32 from
its 16-bit inputs and weights and rounds once what it stores: its output, every array its cache keeps for the
backward, and in the backward its input gradient and the weight gradients it adds into the 16-bit gradient
buffer (`autocast`). A GPU does the same at a finer grain: each matmul reads 16-bit operands, accumulates in
float32 and rounds its output.
Recomputation: full rebuilds a block's 16-bit cache bit for bit; selective recomputes attention's probabilities
in float32 from the cached q and k and never rounds them, so its gradients differ from keeping them by about u.

The optimizer's side, AdamW on float32 master weights (MixedAdamW), is in common/optim.py. Bytes per parameter:
2 (16-bit weights) + 2 (16-bit gradients) + 12 (float32 master weights, Adam's m and v), the 16 of the ZeRO
paper's count (K = 12); --fp32-grads keeps the gradient in float32 (4 bytes), as Megatron's
--accumulate-allreduce-grads-in-fp32 does.
"""
import functools
from collections.abc import Mapping
from dataclasses import replace
from typing import NamedTuple

import numpy as np


SIXTEEN = ("bf16", "fp16")


def sixteen(precision):
    """The NumPy dtype of "bf16" (imported only when asked for: ml_dtypes takes 8 MB a process) or "fp16"."""
    if precision == "bf16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float16)


def storage(train_cfg):
    """The dtype weights and activations are stored in: 16 bits in mixed precision, else --dtype."""
    return sixteen(train_cfg.precision) if train_cfg.precision in SIXTEEN else np.dtype(train_cfg.dtype)


def grad_dtype(train_cfg):
    """The dtype of the gradient buffer (and so of its reduction): the storage's, or float32 with --fp32-grads."""
    return np.dtype(np.float32) if train_cfg.fp32_grads else storage(train_cfg)


def master_dtype(train_cfg):
    """The dtype of the weights the optimizer updates, and of Adam's m and v."""
    return np.dtype(np.float32) if train_cfg.precision in SIXTEEN else np.dtype(train_cfg.dtype)


def describe(train_cfg):
    """The precision for a banner: "float32", or e.g. "bf16 mixed precision (float32 master weights)"."""
    if train_cfg.precision not in SIXTEEN:
        return train_cfg.dtype
    grads = ", float32 gradients" if train_cfg.fp32_grads else ""
    return f"{train_cfg.precision} mixed precision (float32 master weights{grads})"


def is_sixteen(dtype):
    return np.dtype(dtype).name in ("bfloat16", "float16")


def unit_roundoff(dtype):
    """u = 2^-(significand bits): the largest relative error of rounding to nearest in `dtype`."""
    significand = {"bfloat16": 8, "float16": 11, "float32": 24, "float64": 53}[np.dtype(dtype).name]
    return 2.0 ** -significand


class Widths(NamedTuple):
    """Bytes per element of what a run keeps: the weights as the model reads them, their gradient, the
    optimizer's kept state (master weights if any, m and v) and its work arrays, the activations the caches
    keep, and the arithmetic (every intermediate)."""
    weights: int
    grads: int
    state: int
    scratch: int
    activations: int
    work: int


def widths(train_cfg):
    """The Widths of a run's configuration."""
    if train_cfg.precision not in SIXTEEN:
        return plain(np.dtype(train_cfg.dtype).itemsize)
    return Widths(2, grad_dtype(train_cfg).itemsize, 12, 8, 2, 4)  # master, m, v; a work array, the unscaled grad


def plain(e):
    """The widths of training in one dtype of e bytes: weights, gradient, m and v, one work array, activations."""
    return Widths(e, e, 2 * e, e, e, e)


def flushed(got, want):
    """The share of elements that are zero in `got` where `want` (the same values in float32) has none: what
    rounding to 16 bits flushed to zero, e.g. fp16 gradients without loss scaling."""
    return float(np.mean((np.asarray(got) == 0) & (np.asarray(want) != 0)))


# ----------------------------------------------------------------------------- the model in mixed precision

def _widen(obj, wide):
    """obj with every 16-bit array in it (nested in tuples and lists) as a float32 copy, made once per array."""
    if isinstance(obj, np.ndarray):
        if not is_sixteen(obj.dtype):
            return obj
        if id(obj) not in wide:
            wide[id(obj)] = (obj, obj.astype(np.float32))
        return wide[id(obj)][1]
    if isinstance(obj, tuple):
        items = [_widen(o, wide) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_widen(o, wide) for o in obj]
    return obj


def _narrow(obj, dtype, narrow):
    """obj with every float32 array in it (nested in tuples and lists) rounded to `dtype`, once per array (the
    memo `narrow`)."""
    if isinstance(obj, np.ndarray):
        if obj.dtype != np.float32:
            return obj
        if id(obj) not in narrow:                   # kept with obj, so that no later array reuses its id
            narrow[id(obj)] = (obj, _rounded(obj, dtype, narrow))
        return narrow[id(obj)][1]
    if isinstance(obj, tuple):
        items = [_narrow(o, dtype, narrow) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_narrow(o, dtype, narrow) for o in obj]
    return obj


def _rounded(a, dtype, narrow):
    """The float32 array `a` rounded to `dtype`. A view becomes the same view of the array it looks into, rounded
    once: arrays that share memory in float32 (ring attention's output and the view of it its cache keeps) share
    it in 16 bits too, and are counted once."""
    root = a.base
    if isinstance(root, np.ndarray) and root.dtype == np.float32 and root.base is None and root.flags.c_contiguous:
        whole = _narrow(root, dtype, narrow)
        offset = (a.__array_interface__["data"][0] - root.__array_interface__["data"][0]) // root.itemsize
        return np.ndarray(a.shape, dtype, buffer=whole, offset=offset * whole.itemsize,
                          strides=[s // root.itemsize * whole.itemsize for s in a.strides])
    return a.astype(dtype)


class _Wide(Mapping):
    """A dict of 16-bit weights read as float32: each one cast when first read."""

    def __init__(self, views, wide):
        self.views, self.wide = views, wide

    def __getitem__(self, name):
        return _widen(self.views[name], self.wide)

    def __iter__(self):
        return iter(self.views)

    def __len__(self):
        return len(self.views)


class _Sums(Mapping):
    """Float32 gradients, zero when first written, standing in for 16-bit ones (a dict `views`); `add` adds each
    into its 16-bit buffer, rounding once."""

    def __init__(self, views):
        self.views, self.sums = views, {}

    def __getitem__(self, name):
        if name not in self.sums:
            self.sums[name] = np.zeros(self.views[name].shape, np.float32)
        return self.sums[name]

    def __setitem__(self, name, value):                 # g[name] += x: the in-place sum, stored back
        self.sums[name] = value

    def __iter__(self):
        return iter(self.views)

    def __len__(self):
        return len(self.views)

    def add(self):
        for name, s in self.sums.items():
            s += self.views[name]                       # float32 + 16-bit: exact, then one rounding below
            self.views[name][...] = s


def _dtype(g):
    return next(iter(g.values())).dtype if isinstance(g, Mapping) else g.dtype


def autocast(dtype):
    """mp(fn, grads=0): fn run in mixed precision if `dtype` (of the weights) has 16 bits, else fn itself.
    fn computes in float32 from its arguments (16-bit arrays, nested in tuples or in dicts of weights), and its
    float32 results are rounded to `dtype`. grads = k: fn's last k arguments are gradient buffers (arrays, or
    dicts of them) it adds into: 16-bit ones are replaced by float32 zeros, which are then added into them
    (float32 ones, with --fp32-grads, are added into directly)."""
    if not is_sixteen(dtype):
        return lambda fn, grads=0: fn

    def mp(fn, grads=0):
        @functools.wraps(fn)
        def run(*args, **options):                  # options (keep_scores=...) pass through as they are
            wide, n = {}, len(args) - grads
            ins = [_Wide(a, wide) if isinstance(a, Mapping) else _widen(a, wide) for a in args[:n]]
            sums, outs = [], []
            for g in args[n:]:
                if g is None or _dtype(g) == np.float32:
                    outs.append(g)
                else:
                    sums.append(_Sums(g if isinstance(g, Mapping) else {0: g}))
                    outs.append(sums[-1] if isinstance(g, Mapping) else sums[-1][0])
            result = fn(*ins, *outs, **options)
            for s in sums:
                s.add()
            return _narrow(result, dtype, {})
        return run
    return mp


# the functions of common.driver.Parts, and how many gradient buffers each one's last arguments are
PART_FUNCTIONS = {"embedding_forward": 0, "block_forward": 0, "head_forward": 0,
                  "embedding_backward": 1, "block_backward": 1, "head_backward": 1}


def mixed(parts, dtype):
    """A common.driver.Parts whose every part runs in mixed precision (autocast) if `dtype` has 16 bits, and
    whose weight gradients, if the parts can defer them (chapter 05's zero bubble), wait in 16 bits."""
    if not is_sixteen(dtype):
        return parts
    mp = autocast(dtype)
    out = replace(parts, **{name: mp(getattr(parts, name), grads) for name, grads in PART_FUNCTIONS.items()})
    return replace(out, deferring=_deferring(parts, out, dtype) if parts.deferring else None)


class _Stored:
    """The queue a deferring backward (B) appends its weight-gradient terms to, in mixed precision: each term's
    operands are stored in 16 bits until W runs it, and W computes in float32 like any part (autocast). The
    running B's rounded arrays are remembered (`narrow`), so an operand two terms share is stored once."""

    def __init__(self, queue, dtype):
        self.queue, self.dtype, self.narrow = queue, dtype, {}

    def append(self, item):
        if hasattr(item, "inputs"):                     # a weight-gradient term: fn(*inputs, *grads)
            inputs = _narrow(item.inputs, self.dtype, self.narrow)
            item = type(item)(autocast(self.dtype)(item.fn, grads=len(item.grads)), inputs, item.grads)
        self.queue.append(item)


def _deferring(parts, mixed_parts, dtype):
    """Parts.deferring in mixed precision: B computes in float32 from its 16-bit inputs and rounds the input
    gradient it returns; the terms it queues keep their operands in 16 bits (_Stored)."""
    def split(queue):
        stored = _Stored(queue, dtype)
        deferring = parts.deferring(stored)

        def input_grad(fn):
            def run(dx, cache, p, g, **options):
                wide = {}
                stored.narrow = {}
                out = _narrow(fn(_widen(dx, wide), _widen(cache, wide), _Wide(p, wide), g, **options), dtype, {})
                stored.narrow = {}                      # nothing of this B outlives it but what the queue holds
                return out
            return run
        return replace(mixed_parts, **{name: input_grad(getattr(deferring, name)) for name in
                                       ("embedding_backward", "block_backward", "head_backward")})
    return split
