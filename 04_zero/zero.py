"""ZeRO (Rajbhandari et al., 2020): data parallelism whose ranks split the model state instead of replicating it.

Shard. The flat buffers of chapter 01 (Psi elements) are cut into N contiguous shards, rank r owning
[lo_r, hi_r) (a tensor may straddle two shards, as in Megatron's distributed optimizer). Rank r keeps AdamW's
m and v for its shard only, and updates only its shard of the parameters, from its shard of the gradient.

    stage 1  optimizer state sharded. Full parameters and gradients on every rank; after the backward each
             gradient bucket is reduce-scattered (each rank receives the sum of its own part), each rank
             runs AdamW on its shard, and the shards are all-gathered back into every rank's parameters.
    stage 2  gradients sharded too. The backward writes each bucket into a transient buffer that is
             reduce-scattered as soon as its gradients are final, then freed; only the shard persists.
    stage 3  parameters sharded too. Each part of the model (embedding, block i, head) is all-gathered just
             before its forward and again before its backward, and freed right after.

Memory per rank, e bytes per element (float32: e = 4; Adam's m and v: 2e), without the transient buffers:

    data parallel   e Psi + e Psi + 2e Psi      = 16 Psi
    stage 1         e Psi + e Psi + 2e Psi / N  =  8 Psi +  8 Psi / N
    stage 2         e Psi + 3e Psi / N          =  4 Psi + 12 Psi / N
    stage 3         4e Psi / N                  = 16 Psi / N

Communication per step, in elements each rank contributes to collectives (M micro-batches; V C and T C the
sizes of wte and wpe). A ring all-reduce is a reduce-scatter followed by an all-gather, so data parallelism's
all-reduce of Psi counts 2 Psi here:

    stage 1   reduce-scatter Psi (after the last micro-batch) + all-gather Psi               = 2 Psi
    stage 2   reduce-scatter Psi per micro-batch (there is nowhere to accumulate the full
              gradient) + all-gather Psi                                                     = (M + 1) Psi
    stage 3   per micro-batch: all-gather Psi + V C forward (wte twice: embedding and head),
              Psi - T C backward (the embedding's backward reads no weight), reduce-scatter Psi
                                                                                             = M (3 Psi + V C - T C)
"""
import contextlib

import numpy as np

from common.chapters import import_chapter
from common.checkpoint import model_state
from common.memory import Transient
from common.optim import global_norm
from common.precision import plain

dp_lib = import_chapter("03_data_parallel.data_parallel")
STAGES = (1, 2, 3)


# ----------------------------------------------------------------------------- shard

def shard_bounds(size, n):
    """lo_0 = 0 < lo_1 < ... < lo_n = size: n contiguous shards whose sizes differ by at most one element."""
    return [size * r // n for r in range(n + 1)]


def overlap_counts(bounds, start, stop):
    """How many elements of the range [start, stop) lie in each rank's shard."""
    return [max(0, min(stop, hi) - max(start, lo)) for lo, hi in zip(bounds, bounds[1:])]


def largest_part(layout, parts):
    """The most elements stage 3 gathers at once: the largest of the model's `parts` (common.driver.modules) of
    which `layout` holds every tensor, in the layout's own shapes."""
    return max(sum(layout.offsets[n][1] - layout.offsets[n][0] for n in names) for names in parts.values()
               if all(n in layout.offsets for n in names))


def take_shard(layout, tensors, lo, hi, out):
    """out = elements [lo, hi) of the flat buffer that the whole tensors {name: array} make up."""
    for name, (a, b) in layout.offsets.items():
        s, e = max(a, lo), min(b, hi)
        if s < e:
            out[s - lo:e - lo] = tensors[name].reshape(-1)[s - a:e - a]


def runs(layout, names):
    """The tensors `names` as contiguous [start, stop) ranges of the layout, with the names in each."""
    out = []
    for name in sorted(names, key=lambda n: layout.offsets[n][0]):
        start, stop = layout.offsets[name]
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop, out[-1][2] + [name])
        else:
            out.append((start, stop, [name]))
    return out


def owned_bytes(a):
    """Bytes of the array that actually holds a's data (a view counts its whole base)."""
    while a.base is not None:
        a = a.base
    return a.nbytes


class Zero:
    """One rank's model state under ZeRO `stage`, and the hooks gpt_forward/gpt_backward call (see
    common.driver): `forward_hook`/`backward_hook` gather weights (stage 3) and create gradient buckets
    (stages 2-3) into the dicts `p` and `g`; `ready` reduce-scatters the buckets the backward has finished.
    The same zero_grad/ready/finish/step protocol as chapter 03's GradSync; stages 2-3 have no full gradient
    to accumulate micro-batches in, so every micro-batch's backward communicates (`every_microbatch`). Stage 1
    accumulates in `grads`, if given (a part of a larger gradient: chapter 06's experts), else in its own."""

    def __init__(self, stage, layout, modules, full_params, dp, bucket_mb, grad_dtype=None, grads=None):
        self.stage, self.layout, self.modules, self.dp = stage, layout, modules, dp
        self.bounds = shard_bounds(layout.size, dp.size)
        self.lo, self.hi = self.bounds[dp.rank], self.bounds[dp.rank + 1]
        self.dtype = full_params.dtype
        self.grad_dtype = np.dtype(grad_dtype or self.dtype)       # mixed precision with --fp32-grads: float32
        if stage < 3:
            self.params = full_params                               # every rank keeps the whole model
            self.p = layout.views(full_params)
            self.pshard = full_params[self.lo:self.hi]
        else:
            self.pshard = full_params[self.lo:self.hi].copy()       # the rest of full_params is dropped
            self.p = {}                                             # filled part by part, just in time
        if stage == 1:
            self.grads = np.zeros(layout.size, self.grad_dtype) if grads is None else grads
            self.g = layout.views(self.grads)
            self.gshard = self.grads[self.lo:self.hi]
        else:
            self.gshard = np.zeros(self.hi - self.lo, self.grad_dtype)
            self.g = {}                                             # filled bucket by bucket in the backward
        self.buckets = dp_lib.buckets(layout, bucket_mb * 2 ** 20, self.grad_dtype.itemsize)
        self.bucket_of = {name: i for i, (start, stop) in enumerate(self.buckets)
                          for name, (a, _) in layout.offsets.items() if start <= a < stop}
        self.bucket_names = [[n for n, b in self.bucket_of.items() if b == i] for i in range(len(self.buckets))]
        self.live, self.reduced = {}, 0                             # stages 2-3: bucket index -> its buffer
        self.transient = Transient()
        self.every_microbatch = stage > 1

    def _own(self, start, stop):
        """This rank's part of the range [start, stop) as a slice of its shard (empty if it holds none)."""
        a = min(max(start, self.lo), self.hi)
        return slice(a - self.lo, max(a, min(stop, self.hi)) - self.lo)

    # --------------------------------------------------------------------- forward

    def forward_hook(self, module):
        return self._gathered(self.modules[module]) if self.stage == 3 else contextlib.nullcontext()

    @contextlib.contextmanager
    def _gathered(self, names):
        """Stage 3: all-gather the tensors `names` from every rank's shard into `p`; free them on exit."""
        for start, stop, run in runs(self.layout, names):
            buf = self.transient.new("parameters", stop - start, self.dtype)
            self.dp.allgather(self.pshard[self._own(start, stop)], buf, overlap_counts(self.bounds, start, stop))
            for name in run:
                s, e = self.layout.offsets[name]
                self.p[name] = buf[s - start:e - start].reshape(self.layout.shapes[name])
        try:
            yield
        finally:
            for name in names:
                del self.p[name]

    # --------------------------------------------------------------------- backward

    def backward_hook(self, module):
        names = self.modules[module]
        if self.stage >= 2:
            for name in names:
                if name not in self.g:
                    self._new_bucket(self.bucket_of[name])
        if self.stage == 3 and module != "embedding":               # the embedding's backward reads no weight
            return self._gathered(names)
        return contextlib.nullcontext()

    def _new_bucket(self, i):
        start, stop = self.buckets[i]
        self.live[i] = buf = self.transient.new("gradients", stop - start, self.grad_dtype, zeroed=True)
        for name in self.bucket_names[i]:
            s, e = self.layout.offsets[name]
            self.g[name] = buf[s - start:e - start].reshape(self.layout.shapes[name])

    # --------------------------------------------------------------------- synchronise gradients

    def ready(self, name):
        """gpt_backward's hook: reduce-scatter every bucket from `name` to the end of the layout."""
        self._reduce_from(self.layout.offsets[name][0])

    def finish(self):
        """Reduce-scatter the buckets the hook has not (all of them after a backward run without it); the
        next backward starts over."""
        self._reduce_from(0)
        self.reduced = 0

    def _reduce_from(self, done):
        while self.reduced < len(self.buckets) and self.buckets[self.reduced][0] >= done:
            self._reduce_scatter(self.reduced)
            self.reduced += 1

    def _reduce_scatter(self, i):
        start, stop = self.buckets[i]
        counts = overlap_counts(self.bounds, start, stop)
        if self.stage == 1:
            send = self.grads[start:stop]
        else:
            send = self.live.pop(i)
            for name in self.bucket_names[i]:
                del self.g[name]                                    # the buffer is freed with `send`
        piece = self.transient.new("gradients", counts[self.dp.rank], self.grad_dtype)
        self.dp.reduce_scatter(send, piece, counts)
        if self.stage == 1:
            self.gshard[self._own(start, stop)] = piece     # grads held this rank's partial sums until now
        else:
            self.gshard[self._own(start, stop)] += piece    # stages 2-3 accumulate over micro-batches here

    def zero_grad(self):
        (self.grads if self.stage == 1 else self.gshard).fill(0)

    def grad_norm(self, g):
        """The L2 norm of the whole gradient, from every rank's shard `g`."""
        return global_norm(g, [(0, g.size)], self.dp)

    def step(self, opt, lr, grad_clip, norm_of=None):
        """Clip (by the global norm, norm_of(gradient shard), or this data-parallel group's), update this rank's
        shard with its slice of AdamW (in mixed precision: its master shard, then the 16-bit one is rounded from
        it); stages 1-2 all-gather the parameters."""
        g = opt.unscaled(self.gshard)
        opt.update(self.pshard, g, lr, grad_clip, (norm_of or self.grad_norm)(g))
        if self.stage < 3:
            self.dp.allgather(None, self.params, np.diff(self.bounds))   # in place: our shard is already there

    # --------------------------------------------------------------------- checkpoints and the ledgers

    def gather_flat(self, shard, root=0):
        """The whole flat buffer of every rank's `shard` (of params, m or v) on `root`, None elsewhere."""
        flat = np.empty(self.layout.size, shard.dtype) if self.dp.rank == root else None
        self.dp.gather(shard, flat, np.diff(self.bounds), root)
        return flat

    def full_state(self, opt):
        """{"params" | "adam_m" | "adam_v": {name: whole tensor}} consolidated on rank 0 (None elsewhere)."""
        flats = {kind: self.gather_flat(shard) for kind, shard in model_state(self.pshard, opt).items()}
        if self.dp.rank != 0:
            return None
        return {kind: self.layout.views(flat) for kind, flat in flats.items()}

    def load_state(self, state, opt):
        """Take this rank's shards from a consolidated state (any number of ranks may have written it)."""
        for kind, shard in model_state(self.pshard, opt).items():
            take_shard(self.layout, state[kind], self.lo, self.hi, shard)
        opt.cast(self.pshard)                               # mixed precision: the 16-bit shard from the master
        if self.stage < 3:
            take_shard(self.layout, state["params"], 0, self.layout.size, self.params)

    def memory(self, opt):
        """Bytes this rank holds, measured from the arrays: the persistent state, and the transient peaks."""
        state, scratch = opt.kept()                         # mixed precision's: the master too
        return {"parameters": owned_bytes(self.pshard), "gradients": owned_bytes(self.gshard),
                "optimizer": sum(map(owned_bytes, state)),
                "optimizer scratch": sum(map(owned_bytes, scratch)),        # work arrays: not the paper's count
                "gathered parameters (peak)": self.transient.peak["parameters"],
                "gradient buckets (peak)": self.transient.peak["gradients"]}


def memory_formula(stage, psi, shard, widths):
    """The paper's model-state bytes per rank, Psi/N being this rank's `shard` (stage 0: data parallelism), with
    `widths` (common.precision.widths; a number e: all in e bytes) bytes per element: float32 4 + 4 + 8, mixed
    precision 2 + 2 + 12 (the paper's K = 12)."""
    widths = plain(widths) if isinstance(widths, int) else widths
    return {"parameters": widths.weights * (shard if stage >= 3 else psi),
            "gradients": widths.grads * (shard if stage >= 2 else psi),
            "optimizer": widths.state * (shard if stage >= 1 else psi)}


def comm_formula(stage, layout, grad_accum, itemsize, grad_itemsize=None):
    """{kind: bytes} each rank passes to collectives in one training step (see the module docstring): weights
    of `itemsize` bytes, gradients of `grad_itemsize` (mixed precision with --fp32-grads: 4; default the same)."""
    psi, e, M = layout.size, itemsize, grad_accum
    eg = grad_itemsize or itemsize
    if stage == 1:
        return {"reduce_scatter": eg * psi, "allgather": e * psi}
    if stage == 2:
        return {"reduce_scatter": M * eg * psi, "allgather": e * psi}
    vc, tc = (int(np.prod(layout.shapes[name])) for name in ("wte", "wpe"))   # this rank's shapes (TP: a shard)
    return {"reduce_scatter": M * eg * psi, "allgather": M * e * (2 * psi + vc - tc)}
