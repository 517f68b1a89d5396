"""Pipeline parallelism: the layers cut into P stages, one per rank, and the batch into M micro-batches that flow
through them.

Shard. Stage s holds the blocks split_layers(n_layer, P)[s] (interleaved: chunks s, s + P, ... of the model
cut into P V chunks); the first stage also the embedding (wte, wpe), the last also ln_f and, for the tied
LM head, its own copy of wte. Every rank draws the whole init from the seed and keeps its stage's tensors,
so both copies of wte start equal; their gradients are summed between the first and the last stage after
every step (as Megatron does), so they stay equal.

The math. The batch's loss is the mean over M equal micro-batches of their mean losses, so the last stage
seeds each micro-batch's backward with dloss = 1/M and every stage accumulates with +=: after the M
backwards each stage holds exactly its part of the full-batch gradient, whatever M is. The grad norm is
summed over stages, counting wte once.

Schedules. Each stage runs the list of instructions schedules.schedule gives it for one step (afab, 1f1b,
interleaved, zb-h1: see schedules.py, which also checks and simulates them); `Stage` here executes such a
list with MPI through the model driver (common/driver.py: stage_forward/stage_backward), holding each
micro-batch's cache from its forward to its backward (zb-h1: to its W; zero_bubble.py splits the backward).

Communication per step and chunk boundary (point-to-point): M activations of (B/M, T, C) forward and M
gradients of the same shape backward, e bytes per element: B T C e each way; with V chunks a stage has 2V
boundaries (the model's two ends excepted). Plus wte's gradient (vocab x C) all-reduced between the two ends,
the grad norm (8 bytes) and the loss broadcast from the last stage (8 bytes).
"""
import time

import numpy as np

from common.chapters import import_chapter
from common.checkpoint import STATE
from common.comm import wait_all
from common.config import ConfigError
from common.driver import SINGLE, evaluation_parts, no_hook, stage_backward, stage_forward, stage_weights
from common.memory import activation_bytes
from common.model import param_shapes
from common.optim import global_norm
from common.params import Layout

sched = import_chapter("05_pipeline.schedules")
zb = import_chapter("05_pipeline.zero_bubble")


# ----------------------------------------------------------------------------- shard

def stage_layout(gpt_cfg, stage, pp_size, virtual=1):
    """The tensors stage `stage` holds, in the single-core layout's order."""
    layers = [i for chunk in sched.chunk_layers(gpt_cfg.n_layer, stage, pp_size, virtual) for i in chunk]
    first, last = stage == 0, stage == pp_size - 1

    def held(name):
        if name.startswith("h."):
            return int(name.split(".")[1]) in layers
        return {"wte": first or last, "wpe": first, "ln_f.w": last, "ln_f.b": last}[name]

    return Layout([(name, shape) for name, shape in param_shapes(gpt_cfg) if held(name)])


# ----------------------------------------------------------------------------- schedules

def check_layout(gpt_cfg, par, train_cfg):
    """A pipeline's sizes and schedule, checked: one ConfigError naming the flag to change."""
    recompute = train_cfg.recompute
    V, chunks = par.virtual_stages, par.pp * par.virtual_stages
    if gpt_cfg.n_layer < chunks:
        what = (f"--pp {par.pp} x --virtual-stages {V} = {chunks} chunks, and every chunk" if V > 1 else
                f"--pp {par.pp} stages, and every stage")
        raise ConfigError(f"--n-layer {gpt_cfg.n_layer} is fewer than {what} needs a block; choose --pp"
                          f"{' x --virtual-stages' if V > 1 else ''} of at most {gpt_cfg.n_layer}")
    if par.schedule == "interleaved" and par.microbatches % par.pp:
        raise ConfigError(f"--schedule interleaved sends micro-batches through the {par.pp} stages in groups of "
                          f"{par.pp}: --microbatches {par.microbatches} must be a multiple of {par.pp} (Megatron's "
                          "rule)")
    if par.schedule == "zb-h1" and recompute == "full":
        raise ConfigError("--recompute full with --schedule zb-h1 would keep each recomputed block alive until its "
                          "deferred weight gradients run, undoing most of what recomputing saves; use --recompute "
                          "selective with zb-h1, or --schedule 1f1b")


def activation_formula(gpt_cfg, rows, itemsize, par, stage, recompute="none", tp_size=1, sp=False, cp_size=1,
                       cp_mode="ring"):
    """activation_peak of `stage` under par's schedule, micro-batches of `rows` rows, each chunk's cache by the
    formulas of common.memory (its blocks, and the head if it is the model's last chunk)."""
    P, V = par.pp, par.virtual_stages
    chunks = sched.chunk_layers(gpt_cfg.n_layer, stage, P, V)
    sizes = dict(tp_size=tp_size, sp=sp, itemsize=itemsize, cp_size=cp_size)

    def last(c):
        return c * P + stage == P * V - 1

    return sched.activation_peak(
        par.schedule, par.microbatches, stage, P, V,
        kept=lambda c: activation_bytes(gpt_cfg, rows, len(chunks[c]), stage == 0, last(c), recompute=recompute,
                                        ep_size=par.ep, cp_mode=cp_mode, **sizes),
        deferred=lambda c: zb.deferred_bytes(gpt_cfg, rows, len(chunks[c]), last(c), first=stage == 0 and c == 0,
                                             **sizes))


# ----------------------------------------------------------------------------- forward and backward

def tag(receiver, m, M, backward):
    """The MPI tag of micro-batch m's message to virtual stage `receiver`: with P = 2 (or interleaving) one
    neighbour sends both the activations and the gradients, and of several chunks."""
    return 2 * (receiver * M + m) + backward


class Stage:
    """One rank's stage: its parameters and gradients (views `p`, `g`), the point-to-point engine that runs
    a schedule, and the record of what ran when (`trace`) and how many micro-batch chunks were alive (`peak`).
    With `virtual` chunks, chunk v holds the blocks sched.chunk_layers(...)[v]."""

    def __init__(self, gpt_cfg, stage, pp, p, g, parts=zb.deferring(SINGLE), using=None, seq_len=None, dtype=None,
                 virtual=1):
        self.gpt_cfg, self.stage, self.pp, self.p, self.g = gpt_cfg, stage, pp, p, g
        self.chunks = sched.chunk_layers(gpt_cfg.n_layer, stage, pp.size, virtual)
        self.first, self.last = stage == 0, stage == pp.size - 1
        self.parts = parts                      # common.driver.Parts able to defer (zb.deferring); 06_3d's are 02's
        self.evaluating = evaluation_parts(parts)             # forwards no backward follows
        self.using = using or (no_hook, no_hook)            # (forward, backward) hooks: 06_3d's ZeRO-3
        self.seq_len = seq_len or gpt_cfg.block_size              # positions of the activations sent between stages
        self.dtype = dtype or next(iter(p.values())).dtype    # ZeRO-3's `p` is empty between parts
        self.trace, self.peak = [], 0

    def run(self, ops, x, y, scale=1.0, grads_ready=None, finish_each=None):
        """Execute `ops` on the M micro-batches x[m], y[m] (token ids; every stage has them, only the ends read
        them), the loss's gradient scaled by `scale` / M. The last backward of each chunk (its last W, if the
        weight gradients are deferred) gets the `grads_ready` hook (see common.driver.stage_backward): data
        parallelism can start reducing while it runs. With `finish_each` (ZeRO-2/3's finish: no full gradient
        to accumulate in), every backward gets the hook and is followed by finish_each(). Returns the mean
        loss on the last stage, else None."""
        M, b, T, C = len(x), x[0].shape[0], self.seq_len, self.gpt_cfg.n_embd
        P, V, s, dtype = self.pp.size, len(self.chunks), self.stage, self.dtype
        inp, out, caches, grad_out, grad_in, weights, losses, sends = {}, {}, {}, {}, {}, {}, [], []
        deferred = any(op == "weights" for op, _, _ in ops)
        assert not (deferred and finish_each), "ZeRO-2/3 finish each backward: the weights must not wait"
        last_of_chunk = {c: i for i, (op, _, c) in enumerate(ops) if op == ("weights" if deferred else "backward")}
        keep = bool(last_of_chunk)                                        # no backward: no cache is kept
        self.trace, self.peak, t0 = [], 0, time.perf_counter()
        for i, (op, m, c) in enumerate(ops):
            start, k = time.perf_counter(), c * P + s
            first, last = k == 0, k == P * V - 1
            hook = grads_ready if finish_each or last_of_chunk.get(c) == i else None
            if op == "recv_fwd":
                inp[m, c] = self.pp.recv(np.empty((b, T, C), dtype), (s - 1) % P, tag=tag(k, m, M, 0))
            elif op == "forward":
                act, loss, cache = stage_forward(self.p, x[m] if first else inp.pop((m, c)), y[m] if last else None,
                                                 self.gpt_cfg, self.chunks[c], first, last, self.using[0],
                                                 self.parts if keep else self.evaluating)
                if keep:
                    caches[m, c] = cache
                del cache                            # only `caches` may hold it, or it outlives its backward
                if not last:                                             # the logits are not needed again
                    out[m, c] = act
                elif loss is not None:
                    losses.append(loss)
                self.peak = max(self.peak, len(caches) + len(weights))
            elif op == "send_fwd":
                buf = out.pop((m, c))
                sends.append((self.pp.isend(buf, (s + 1) % P, tag=tag(k + 1, m, M, 0)), buf))  # lives until waited
            elif op == "recv_bwd":
                grad_out[m, c] = self.pp.recv(np.empty((b, T, C), dtype), (s + 1) % P, tag=tag(k, m, M, 1))
            elif op == "backward":
                queue = weights.setdefault((m, c), []) if deferred else None
                # the batch loss is the mean over M; no local name keeps the gradient received past its W
                grad_in[m, c] = stage_backward(caches.pop((m, c)), self.p, self.g,
                                               scale / M if last else grad_out.pop((m, c)), hook, self.using[1], queue,
                                               dloss=scale / M)
                if deferred and self.parts.hold:
                    self.parts.hold(zb.queued_operands(queue))          # the output gradients W will read
                if finish_each:
                    finish_each()
            elif op == "weights":
                stage_weights(weights.pop((m, c)), self.g, self.parts, hook)
            elif op == "send_bwd":
                buf = grad_in.pop((m, c))
                sends.append((self.pp.isend(buf, (s - 1) % P, tag=tag(k - 1, m, M, 1)), buf))
            self.trace.append((op, m, c, start - t0, time.perf_counter() - t0))
            sends = [(req, buf) for req, buf in sends if not req.Test()]   # free what has arrived
        wait_all([req for req, _ in sends])
        return float(np.mean(losses)) if self.last else None


# ----------------------------------------------------------------------------- synchronise gradients

def end_stages(pp_comm, stage, pp_size):
    """The communicator of the first and the last of `pp_size` stages, which hold wte's two copies (the middle
    stages get one of their own, unused)."""
    return pp_comm.split(color=int(stage not in (0, pp_size - 1)), key=stage, name="ends")


def sync_tied_embedding(g, ends, stage, pp_size):
    """Sum wte's two partial gradients, the embedding's (first stage) and the LM head's (last stage)."""
    if pp_size > 1 and stage in (0, pp_size - 1):
        ends.allreduce(g["wte"])


def counts_once(name, stage, pp):
    """Whether `stage` counts this tensor in a global sum over the model: wte on the first stage only."""
    return not (name == "wte" and stage == pp - 1 and pp > 1)


def grad_norm(grads, layout, stage, pp_comm):
    """The global L2 norm over every stage."""
    return global_norm(grads, layout.ranges(lambda name: counts_once(name, stage, pp_comm.size)), pp_comm)


# ----------------------------------------------------------------------------- what the runs show

def p2p_formula(gpt_cfg, batch_size, stage, pp_size, itemsize, seq_len=None, virtual=1):
    """{kind: bytes} of one step's point-to-point calls on `stage`: B T C e per direction and chunk boundary;
    interleaving makes V times as many boundaries, all but the model's two ends crossing between ranks."""
    if pp_size == 1:
        return {}
    each = batch_size * (seq_len or gpt_cfg.block_size) * gpt_cfg.n_embd * itemsize
    crossings = 2 * virtual - (stage == 0) - (stage == pp_size - 1)   # activations out, gradients back in
    return {"isend": crossings * each, "recv": crossings * each}


# ----------------------------------------------------------------------------- checkpoints

def stage_sizes(gpt_cfg, pp_size, virtual=1):
    return [stage_layout(gpt_cfg, s, pp_size, virtual).size for s in range(pp_size)]


def whole_state(gpt_cfg, flats, comm, root=None, virtual=1):
    """{"params" | "adam_m" | "adam_v": {name: whole tensor}} from every stage's flat buffers (`flats`, in that
    order), gathered on `root` (None elsewhere), or on every rank if root is None."""
    counts = stage_sizes(gpt_cfg, comm.size, virtual)
    starts = np.cumsum([0] + counts)
    state = {}
    for kind, flat in zip(STATE, flats):
        buf = np.empty(starts[-1], flat.dtype) if root in (None, comm.rank) else None
        if root is None:
            comm.allgather(flat, buf, counts)
        else:
            comm.gather(flat, buf, counts, root)
        if buf is not None:
            state[kind] = {}
            for s in range(comm.size):                          # wte: the first stage's copy (both are equal)
                views = stage_layout(gpt_cfg, s, comm.size, virtual).views(buf[starts[s]:starts[s + 1]])
                for name, view in views.items():
                    state[kind].setdefault(name, view)
    return state or None
