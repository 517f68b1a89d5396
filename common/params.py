"""Flat parameter and gradient buffers with named views, as llm.c and Megatron's distributed optimizer keep them.

One contiguous array holds every tensor; `views(flat)["h.0.attn.c_attn.w"]` is a reshaped slice of it. The
gradient buffer has the same layout, so data parallelism can all-reduce it in one call, ZeRO can shard it
by offset and AdamW is a handful of vectorised operations over the whole model.
"""
import math

import numpy as np


class Layout:
    """Names, shapes and offsets of tensors packed one after another into a flat buffer."""

    def __init__(self, shapes):
        self.shapes = dict(shapes)                      # name -> shape, in buffer order
        self.offsets = {}                               # name -> (start, stop)
        start = 0
        for name, shape in self.shapes.items():
            stop = start + math.prod(shape)
            self.offsets[name] = (start, stop)
            start = stop
        self.size = start

    def views(self, flat):
        """name -> view of `flat` with that tensor's shape (writes go to the buffer)."""
        assert flat.shape == (self.size,), f"buffer of {flat.shape} for a layout of {self.size} elements"
        return {name: flat[a:b].reshape(self.shapes[name]) for name, (a, b) in self.offsets.items()}

    def ranges(self, keep, lo=0, hi=None):
        """[start, stop) ranges, relative to `lo`, of the tensors where keep(name) holds, cut to [lo, hi): the
        parts of a flat buffer (or of its shard [lo, hi)) that a rank counts, e.g. in the global grad norm."""
        hi = self.size if hi is None else hi
        return [(max(a, lo) - lo, min(b, hi) - lo) for name, (a, b) in self.offsets.items()
                if keep(name) and max(a, lo) < min(b, hi)]

    def mask(self, predicate, dtype=bool):
        """A flat array that is 1 where predicate(name, shape) holds, e.g. which elements get weight decay."""
        out = np.zeros(self.size, dtype=dtype)
        for name, (a, b) in self.offsets.items():
            out[a:b] = predicate(name, self.shapes[name])
        return out


def sub(views, prefix):
    """The views whose names start with `prefix`, with the prefix removed: sub(p, "h.0.")["ln_1.w"]."""
    n = len(prefix)
    return {name[n:]: v for name, v in views.items() if name.startswith(prefix)}
