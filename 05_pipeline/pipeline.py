"""Pipeline parallelism: the layers cut into P stages, one per rank, and the batch into M micro-batches that flow
through them.

Shard. Stage s holds the blocks split_layers(n_layer, P)[s]; the first stage also the embedding (wte, wpe),
the last also ln_f and, for the tied LM head, its own copy of wte. Every rank draws the whole init from the
seed and keeps its stage's tensors, so both copies of wte start equal; their gradients are summed between
the first and the last stage after every step (as Megatron does), so they stay equal.

The math. The batch's loss is the mean over M equal micro-batches of their mean losses, so the last stage
seeds each micro-batch's backward with dloss = 1/M and every stage accumulates with +=: after the M
backwards each stage holds exactly its part of the full-batch gradient, whatever M is. The grad norm is
summed over stages, counting wte once.

Schedules (per stage, a sequence of instructions: see `schedule`):
    afab   all M forwards, then all M backwards (GPipe): M micro-batches' activations alive at the peak
    1f1b   P-1-s warm-up forwards, then one forward, one backward, ...: at most P - s alive on stage s
Both leave each stage idle for (P-1) forward+backward slots of the M+P-1 in a step: the bubble fraction
(P-1)/(M+P-1), if every stage takes the same time per micro-batch.

Communication per step and boundary (point-to-point): M activations of (B/M, T, C) forward and M gradients
of the same shape backward, e bytes per element: B T C e each way. Plus wte's gradient (V C) all-reduced
between the two ends, the grad norm (8 bytes) and the loss broadcast from the last stage (8 bytes).
"""
import time

import numpy as np

from common.comm import wait_all
from common.model import SINGLE, _no_hook, param_shapes, stage_backward, stage_forward
from common.optim import global_norm
from common.params import Layout


# ----------------------------------------------------------------------------- shard

def split_layers(n_layer, pp_size):
    """Blocks of each stage: as even as possible, the first n_layer % pp_size stages taking one more."""
    sizes = [n_layer // pp_size + (s < n_layer % pp_size) for s in range(pp_size)]
    starts = np.cumsum([0] + sizes)
    return [range(starts[s], starts[s + 1]) for s in range(pp_size)]


def stage_layout(gpt_cfg, stage, pp_size):
    """The tensors stage `stage` holds, in the single-core layout's order."""
    layers = split_layers(gpt_cfg.n_layer, pp_size)[stage]
    first, last = stage == 0, stage == pp_size - 1

    def held(name):
        if name.startswith("h."):
            return int(name.split(".")[1]) in layers
        return {"wte": first or last, "wpe": first, "ln_f.w": last, "ln_f.b": last}[name]

    return Layout([(name, shape) for name, shape in param_shapes(gpt_cfg) if held(name)])


# ----------------------------------------------------------------------------- schedules

def schedule(kind, M, stage, pp_size):
    """The instructions of one step on `stage`, as (op, micro-batch) pairs; op is one of recv_fwd, forward,
    send_fwd, recv_bwd, backward, send_bwd. kind "forward" is the forward half alone (evaluation)."""
    first, last = stage == 0, stage == pp_size - 1

    def fwd(m):
        return ([] if first else [("recv_fwd", m)]) + [("forward", m)] + ([] if last else [("send_fwd", m)])

    def bwd(m):
        return ([] if last else [("recv_bwd", m)]) + [("backward", m)] + ([] if first else [("send_bwd", m)])

    if kind == "forward":
        return [op for m in range(M) for op in fwd(m)]
    if kind == "afab":
        return [op for m in range(M) for op in fwd(m)] + [op for m in range(M) for op in bwd(m)]
    warmup = min(pp_size - 1 - stage, M)                          # 1f1b
    ops = [op for m in range(warmup) for op in fwd(m)]
    for i in range(M - warmup):                                   # steady state: one forward, one backward
        ops += fwd(warmup + i) + bwd(i)
    return ops + [op for m in range(M - warmup, M) for op in bwd(m)]


def simulate(kind, M, pp_size, t_f=1.0, t_b=2.0):
    """Every stage's trace [(op, micro-batch, start, end), ...] when its instructions of `schedule(kind, ...)` run
    as soon as they can, as MPI runs them: a send never blocks, a recv waits for its send; a forward takes t_f
    and a backward t_b (one number, or one per stage). Raises on a deadlock: the check that a schedule is a
    valid program, and its ideal timeline."""
    t_f, t_b = np.broadcast_to(t_f, pp_size), np.broadcast_to(t_b, pp_size)
    programs = [schedule(kind, M, s, pp_size) for s in range(pp_size)]
    pc, clock, sent = [0] * pp_size, [0.0] * pp_size, {}
    traces = [[] for _ in range(pp_size)]
    while any(pc[s] < len(programs[s]) for s in range(pp_size)):
        progressed = False
        for s in range(pp_size):
            while pc[s] < len(programs[s]):
                op, m = programs[s][pc[s]]
                needs = {"recv_fwd": ("fwd", s - 1, m), "recv_bwd": ("bwd", s + 1, m)}.get(op)
                if needs and needs not in sent:
                    break                                            # its message has not been sent yet
                start = clock[s]
                end = max(start, sent[needs]) if needs else start + {"forward": t_f[s], "backward": t_b[s]}.get(op, 0)
                if op in ("send_fwd", "send_bwd"):
                    sent[(op[-3:], s, m)] = end
                traces[s].append((op, m, start, end))
                clock[s], pc[s], progressed = end, pc[s] + 1, True
        if not progressed:
            raise RuntimeError(f"{kind} deadlocks at M={M}, P={pp_size}: stages wait at instructions {pc}")
    return traces


def peak_alive(trace):
    """The most micro-batches whose activations a stage held at once: forwards not yet matched by a backward."""
    alive = peak = 0
    for op, *_ in trace:
        alive += {"forward": 1, "backward": -1}.get(op, 0)
        peak = max(peak, alive)
    return peak


# ----------------------------------------------------------------------------- forward and backward

class Stage:
    """One rank's stage: its parameters and gradients (views `p`, `g`), the point-to-point engine that runs
    a schedule, and the record of what ran when (`trace`) and how many micro-batches were alive (`peak`)."""

    def __init__(self, gpt_cfg, stage, pp, p, g, parts=SINGLE, using=None, seq_len=None, dtype=None):
        self.gpt_cfg, self.stage, self.pp, self.p, self.g = gpt_cfg, stage, pp, p, g
        self.layers = split_layers(gpt_cfg.n_layer, pp.size)[stage]
        self.first, self.last = stage == 0, stage == pp.size - 1
        self.parts = parts                                    # 06_3d passes tensor-parallel ones
        self.using = using or (_no_hook, _no_hook)            # (forward, backward) hooks: 06_3d's ZeRO-3
        self.seq_len = seq_len or gpt_cfg.block_size              # positions of the activations sent between stages
        self.dtype = dtype or next(iter(p.values())).dtype    # ZeRO-3's `p` is empty between parts
        self.trace, self.peak = [], 0

    def run(self, ops, x, y, scale=1.0, grads_ready=None, finish_each=None):
        """Execute `ops` on the M micro-batches x[m], y[m] (token ids; every stage has them, only the ends read
        them), the loss's gradient scaled by `scale` / M. The step's last backward gets the `grads_ready` hook
        (see common.model.stage_backward): data parallelism can start reducing while it runs. With
        `finish_each` (ZeRO-2/3's finish: no full gradient to accumulate in), every backward gets the hook and
        is followed by finish_each(). Returns the mean loss on the last stage, else None."""
        M, b, T, C = len(x), x[0].shape[0], self.seq_len, self.gpt_cfg.n_embd
        dtype = self.dtype
        inp, out, caches, grad_out, grad_in, losses, sends = {}, {}, {}, {}, {}, [], []
        backwards = [m for op, m in ops if op == "backward"]             # none: no cache is kept
        self.trace, self.peak, t0 = [], 0, time.perf_counter()
        for op, m in ops:
            start = time.perf_counter()
            if op == "recv_fwd":
                inp[m] = self.pp.recv(np.empty((b, T, C), dtype), self.stage - 1, tag=m)
            elif op == "forward":
                act, loss, cache = stage_forward(self.p, x[m] if self.first else inp.pop(m),
                                                 y[m] if self.last else None, self.gpt_cfg, self.layers,
                                                 self.first, self.last, self.using[0], self.parts)
                if backwards:
                    caches[m] = cache
                if not self.last:                                        # the logits are not needed again
                    out[m] = act
                losses.append(loss)
                self.peak = max(self.peak, len(caches))
            elif op == "send_fwd":
                buf = out.pop(m)
                sends.append((self.pp.isend(buf, self.stage + 1, tag=m), buf))   # buf lives until the wait
            elif op == "recv_bwd":
                grad_out[m] = self.pp.recv(np.empty((b, T, C), dtype), self.stage + 1, tag=m)
            elif op == "backward":
                dout = scale / M if self.last else grad_out.pop(m)       # the batch loss is the mean over M
                hook = grads_ready if finish_each or m == backwards[-1] else None   # all summed by then
                grad_in[m] = stage_backward(caches.pop(m), self.p, self.g, dout, hook, self.using[1])
                if finish_each:
                    finish_each()
            elif op == "send_bwd":
                buf = grad_in.pop(m)
                sends.append((self.pp.isend(buf, self.stage - 1, tag=m), buf))
            self.trace.append((op, m, start - t0, time.perf_counter() - t0))
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

def bubble(trace, step_time):
    """Fraction of the step's wall time (from the common start) this stage spent neither in a forward nor in a
    backward."""
    busy = sum(end - start for op, _, start, end in trace if op in ("forward", "backward"))
    return 1.0 - busy / step_time


def bubble_formula(M, pp_size):
    return (pp_size - 1) / (M + pp_size - 1)


def p2p_formula(gpt_cfg, batch_size, stage, pp_size, itemsize, seq_len=None):
    """{kind: bytes} of one step's point-to-point calls on `stage`: B T C e per direction and neighbour."""
    each = batch_size * (seq_len or gpt_cfg.block_size) * gpt_cfg.n_embd * itemsize
    out = {}
    if stage < pp_size - 1:
        out.update(isend=each, recv=each)                      # activations out, their gradients back in
    if stage > 0:
        out["recv"] = out.get("recv", 0) + each
        out["isend"] = out.get("isend", 0) + each
    return out


# ----------------------------------------------------------------------------- checkpoints

def stage_sizes(gpt_cfg, pp_size):
    return [stage_layout(gpt_cfg, s, pp_size).size for s in range(pp_size)]


def whole_state(gpt_cfg, flats, comm, root=None):
    """{"params" | "adam_m" | "adam_v": {name: whole tensor}} from every stage's flat buffers (`flats`, in that
    order), gathered on `root` (None elsewhere), or on every rank if root is None."""
    counts = stage_sizes(gpt_cfg, comm.size)
    starts = np.cumsum([0] + counts)
    state = {}
    for part, flat in zip(("params", "adam_m", "adam_v"), flats):
        buf = np.empty(starts[-1], flat.dtype) if root in (None, comm.rank) else None
        if root is None:
            comm.allgather(flat, buf, counts)
        else:
            comm.gather(flat, buf, counts, root)
        if buf is not None:
            state[part] = {}
            for s in range(comm.size):                          # wte: the first stage's copy (both are equal)
                for name, view in stage_layout(gpt_cfg, s, comm.size).views(buf[starts[s]:starts[s + 1]]).items():
                    state[part].setdefault(name, view)
    return state or None
