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

Schedules (per stage, a sequence of instructions: see `schedule`):
    afab         all M forwards, then all M backwards (GPipe): M micro-batches' activations alive at the peak
    1f1b         P-1-s warm-up forwards, then one forward, one backward, ...: at most P - s alive on stage s
    interleaved  1f1b over V chunks of layers per stage (Megatron's virtual pipeline): each idle slot V times
                 thinner, for V times the point-to-point messages and more activations alive
    zb-h1        1f1b whose backward computes only the input gradient (B), the weight gradients (W) run
                 later, in what were idle slots (Qi et al., "Zero Bubble Pipeline Parallelism", 2023)
afab and 1f1b leave each stage idle for (P-1) forward+backward slots of the M+P-1 in a step: the bubble
fraction (P-1)/(M+P-1), if every stage takes the same time per micro-batch; interleaved (P-1)/(VM+P-1);
zb-h1 (P-1)(F+B-W)/(M(F+B+W)+(P-1)(F+B-W)) for a forward F, B and W: a third of 1f1b's slots when all
three are equal. `simulate` runs any schedule on ideal stages; `check_schedule` proves one a valid program.

Communication per step and chunk boundary (point-to-point): M activations of (B/M, T, C) forward and M
gradients of the same shape backward, e bytes per element: B T C e each way; with V chunks a stage has 2V
boundaries (the model's two ends excepted). Plus wte's gradient (vocab x C) all-reduced between the two ends,
the grad norm (8 bytes) and the loss broadcast from the last stage (8 bytes).
"""
import time

import numpy as np

from common.comm import wait_all
from common.config import ConfigError
from common.layers import queued_operands
from common.memory import activation_bytes, deferred_bytes, recompute_bytes
from common.model import (SINGLE, _no_hook, evaluation_parts, param_shapes, stage_backward, stage_forward,
                          stage_weights)
from common.optim import global_norm
from common.params import Layout


# ----------------------------------------------------------------------------- shard

def split_layers(n_layer, pp_size):
    """Blocks of each stage: as even as possible, the first n_layer % pp_size stages taking one more."""
    sizes = [n_layer // pp_size + (s < n_layer % pp_size) for s in range(pp_size)]
    starts = np.cumsum([0] + sizes)
    return [range(starts[s], starts[s + 1]) for s in range(pp_size)]


def chunk_layers(n_layer, stage, pp_size, virtual=1):
    """The blocks of each of `stage`'s `virtual` chunks: the model cut into pp_size x virtual chunks, chunk
    v of stage s being the (v pp_size + s)-th (Megatron's virtual pipeline: stage 0 holds chunks 0, P, 2P...)."""
    pieces = split_layers(n_layer, pp_size * virtual)
    return [pieces[v * pp_size + stage] for v in range(virtual)]


def stage_layout(gpt_cfg, stage, pp_size, virtual=1):
    """The tensors stage `stage` holds, in the single-core layout's order."""
    layers = [i for chunk in chunk_layers(gpt_cfg.n_layer, stage, pp_size, virtual) for i in chunk]
    first, last = stage == 0, stage == pp_size - 1

    def held(name):
        if name.startswith("h."):
            return int(name.split(".")[1]) in layers
        return {"wte": first or last, "wpe": first, "ln_f.w": last, "ln_f.b": last}[name]

    return Layout([(name, shape) for name, shape in param_shapes(gpt_cfg) if held(name)])


# ----------------------------------------------------------------------------- schedules

SCHEDULES = ("afab", "1f1b", "interleaved", "zb-h1")


def check_layout(gpt_cfg, par, recompute="none"):
    """A pipeline's sizes and schedule, checked: one ConfigError naming the flag to change."""
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


def check_schedule_args(kind, M, pp_size, virtual):
    """The rules a schedule's sizes must follow, as ValueError."""
    if kind not in (*SCHEDULES, "forward"):
        raise ValueError(f"unknown schedule {kind!r}: one of {', '.join(SCHEDULES)}")
    if (kind == "interleaved") != (virtual > 1) and kind != "forward":
        raise ValueError("the interleaved schedule needs 2 or more virtual stages per rank, and only it runs them"
                         if kind == "interleaved" else f"the {kind} schedule runs one chunk per stage, not {virtual}")
    if virtual > 1 and M % pp_size:
        raise ValueError(f"the interleaved schedule sends micro-batches in groups of the {pp_size} stages: "
                         f"{M} micro-batches is not a multiple of {pp_size}")


def schedule(kind, M, stage, pp_size, virtual=1):
    """The instructions of one step on `stage`, as (op, micro-batch, chunk) triples; op is one of recv_fwd,
    forward, send_fwd, recv_bwd, backward, send_bwd, weights; chunk is which of the stage's `virtual` chunks
    (0 unless interleaved). kind "forward" is the forward half alone (evaluation).

    afab         all M forwards, then all M backwards (GPipe)
    1f1b         P-1-s warm-up forwards, then one forward and one backward, ..., then the last backwards
    interleaved  1f1b over V chunks per stage, in Megatron's order: micro-batches go through in groups of P,
                 each group through chunk 0, then chunk 1, ...; 2(P-1-s) + (V-1)P warm-up forwards
    zb-h1        1f1b whose backward computes only the input gradient (B); the weight gradients (W) of
                 micro-batch i - s follow the backward of micro-batch i, the rest at the end (Qi et al., 2023)
    """
    check_schedule_args(kind, M, pp_size, virtual)
    P, V = pp_size, virtual

    def order(k, forward):                      # the k-th forward or backward's (micro-batch, chunk)
        chunk = (k // P) % V
        return (k // (P * V)) * P + k % P, chunk if forward else V - 1 - chunk

    def fwd(m, c):
        k = c * P + stage                        # the chunk's place along the whole pipeline
        return (([] if k == 0 else [("recv_fwd", m, c)]) + [("forward", m, c)] +
                ([] if k == P * V - 1 else [("send_fwd", m, c)]))

    def bwd(m, c):
        k = c * P + stage
        return (([] if k == P * V - 1 else [("recv_bwd", m, c)]) + [("backward", m, c)] +
                ([] if k == 0 else [("send_bwd", m, c)]))

    forwards = [fwd(*order(k, True)) for k in range(M * V)]
    backwards = [bwd(*order(k, False)) for k in range(M * V)]
    if kind == "forward":
        return [op for ops in forwards for op in ops]
    if kind == "afab":
        return [op for ops in forwards + backwards for op in ops]
    warmup = min(P - 1 - stage if kind != "interleaved" else 2 * (P - 1 - stage) + (V - 1) * P, M * V)
    ops = [op for ops in forwards[:warmup] for op in ops]
    for i in range(M * V):                      # steady state: one forward, one backward; then the rest
        ops += (forwards[warmup + i] if warmup + i < M * V else []) + backwards[i]
        if kind == "zb-h1" and i >= stage:
            ops.append(("weights", i - stage, 0))
    if kind == "zb-h1":
        ops += [("weights", m, 0) for m in range(max(0, M - stage), M)]
    return ops


def simulate(kind, M, pp_size, t_f=1.0, t_b=2.0, t_w=0.0, virtual=1):
    """Every stage's trace [(op, micro-batch, chunk, start, end), ...] when its instructions of `schedule(kind,
    ...)` run as soon as they can, as MPI runs them: a send never blocks, a recv waits for its send; each
    forward takes t_f, backward t_b and weights t_w (one number, or one per stage; per instruction, so one
    chunk's). Raises on a deadlock: the check that a schedule is a valid program, and its ideal timeline."""
    P, V = pp_size, virtual
    cost = {op: np.broadcast_to(t, P) for op, t in (("forward", t_f), ("backward", t_b), ("weights", t_w))}
    programs = [schedule(kind, M, s, P, V) for s in range(P)]
    pc, clock, sent = [0] * P, [0.0] * P, {}
    traces = [[] for _ in range(P)]
    while any(pc[s] < len(programs[s]) for s in range(P)):
        progressed = False
        for s in range(P):
            while pc[s] < len(programs[s]):
                op, m, c = programs[s][pc[s]]
                k = c * P + s
                needs = {"recv_fwd": ("fwd", k, m), "recv_bwd": ("bwd", k, m)}.get(op)
                if needs and needs not in sent:
                    break                                            # its message has not been sent yet
                start = clock[s]
                end = max(start, sent[needs]) if needs else start + (cost[op][s] if op in cost else 0.0)
                if op in ("send_fwd", "send_bwd"):
                    sent[(op[-3:], k + 1 if op == "send_fwd" else k - 1, m)] = end    # keyed by its receiver
                traces[s].append((op, m, c, start, end))
                clock[s], pc[s], progressed = end, pc[s] + 1, True
        if not progressed:
            raise RuntimeError(f"{kind} deadlocks at M={M}, P={P}, V={V}: stages wait at instructions {pc}")
    return traces


def peak_alive(trace):
    """The most micro-batch chunks whose activations a stage held at once: forwards not yet matched by their
    backward, or, where weight gradients are deferred, by their weights (W still reads the inputs it saved)."""
    freed_by = "weights" if any(op == "weights" for op, *_ in trace) else "backward"
    alive = peak = 0
    for op, *_ in trace:
        alive += {"forward": 1, freed_by: -1}.get(op, 0)
        peak = max(peak, alive)
    return peak


def alive_bound(kind, M, stage, pp_size, virtual=1):
    """The most micro-batch chunks a schedule keeps alive on `stage` (each chunk holding 1/virtual of the
    stage's blocks): afab all M; 1f1b P - s; interleaved its warm-up + 1; zb-h1 P on every stage (the
    deferred W's hold what 1f1b frees: the peak of 1f1b's first stage, everywhere)."""
    P, V = pp_size, virtual
    return {"afab": M, "1f1b": min(P - stage, M), "interleaved": min(2 * (P - 1 - stage) + (V - 1) * P + 1, M * V),
            "zb-h1": min(P, M), "forward": 0}[kind]


def activation_peak(kind, M, stage, pp_size, virtual, kept, deferred=None, working=0):
    """The most bytes of activations `stage` holds at once in one step of `schedule(kind, ...)`: each micro-batch
    chunk's cache, kept(chunk) bytes, from its forward to its backward, or where the weight gradients wait (zb-h1),
    deferred(chunk) bytes of it from there to its W; plus, under full recomputation, `working` (the one block
    rebuilt) at each backward. Counted at the moments the measurement counts (common.memory.Transient.hold): as
    each forward ends and as each backward rebuilds a block."""
    alive, peak = {}, 0
    for op, m, c in schedule(kind, M, stage, pp_size, virtual):
        if op == "forward":
            alive[m, c] = kept(c)
            peak = max(peak, sum(alive.values()))
        elif op == "backward":
            peak = max(peak, sum(alive.values()) + working)
            alive[m, c] = deferred(c) if kind == "zb-h1" else 0
            peak = max(peak, sum(alive.values()))          # zb-h1: the queue's output gradients, counted as made
        elif op == "weights":
            alive[m, c] = 0
    return peak


def activation_formula(gpt_cfg, rows, itemsize, par, stage, recompute="none", tp_size=1, sp=False, cp_size=1):
    """activation_peak of `stage` under par's schedule, micro-batches of `rows` rows, each chunk's cache by the
    formulas of common.memory (its blocks, and the head if it is the model's last chunk)."""
    P, V = par.pp, par.virtual_stages
    chunks = chunk_layers(gpt_cfg.n_layer, stage, P, V)
    sizes = dict(tp_size=tp_size, sp=sp, itemsize=itemsize, cp_size=cp_size)

    def last(c):
        return c * P + stage == P * V - 1

    return activation_peak(
        par.schedule, par.microbatches, stage, P, V,
        kept=lambda c: activation_bytes(gpt_cfg, rows, len(chunks[c]), stage == 0, last(c), recompute=recompute,
                                        **sizes),
        deferred=lambda c: deferred_bytes(gpt_cfg, rows, len(chunks[c]), last(c), first=stage == 0 and c == 0,
                                          **sizes),
        working=recompute_bytes(gpt_cfg, rows, recompute=recompute, **sizes))


def check_schedule(kind, M, pp_size, virtual=1):
    """Prove one schedule a valid program on every stage, or raise AssertionError: each micro-batch chunk
    forwarded once, its backward after its forward and its W (zb-h1) after its backward; each receive
    before the forward or backward that reads it and each send after the one that computes it; every
    receive matched by one send of its neighbour; no deadlock (simulate); the peak number of micro-batch
    chunks alive within alive_bound. Returns the peaks."""
    P, V = pp_size, virtual
    programs = [schedule(kind, M, s, P, V) for s in range(P)]
    sends, recvs = [], []
    for s, ops in enumerate(programs):
        where = {}
        for i, (op, m, c) in enumerate(ops):
            assert (op, m, c) not in where, f"stage {s} runs {op} of micro-batch {m} chunk {c} twice"
            where[op, m, c] = i
            k = c * P + s
            if op.startswith("send"):
                sends.append((op[-3:], k + 1 if op == "send_fwd" else k - 1, m))
            elif op.startswith("recv"):
                recvs.append((op[-3:], k, m))
        for m in range(M):
            for c in range(V):
                k = c * P + s
                steps = [("recv_fwd", k > 0), ("forward", True), ("send_fwd", k < P * V - 1)]
                if kind != "forward":
                    steps += [("recv_bwd", k < P * V - 1), ("backward", True), ("send_bwd", k > 0)]
                if kind == "zb-h1":
                    steps += [("weights", True)]
                missing = [op for op, needed in steps if needed and (op, m, c) not in where]
                assert not missing, f"{kind} stage {s} never runs {missing} of micro-batch {m} chunk {c}"
                at = [where[op, m, c] for op, needed in steps if needed]
                assert at == sorted(at), f"{kind} stage {s} runs micro-batch {m} chunk {c}'s ops out of order"
        allowed = {op for op, _ in steps}
        extra = [(op, m, c) for op, m, c in ops if not (m < M and c < V and op in allowed)]
        assert not extra, f"{kind} stage {s} runs instructions it should not: {extra[:3]}"
    assert sorted(sends) == sorted(recvs), f"{kind}: the sends and receives do not match"
    peaks = [peak_alive(trace) for trace in simulate(kind, M, P, virtual=V, t_w=1.0)]
    bound = [alive_bound(kind, M, s, P, V) for s in range(P)]
    assert all(peak <= b for peak, b in zip(peaks, bound)), f"{kind}: peaks {peaks} above the bound {bound}"
    return peaks


# ----------------------------------------------------------------------------- forward and backward

def tag(receiver, m, M, backward):
    """The MPI tag of micro-batch m's message to virtual stage `receiver`: with P = 2 (or interleaving) one
    neighbour sends both the activations and the gradients, and of several chunks."""
    return 2 * (receiver * M + m) + backward


class Stage:
    """One rank's stage: its parameters and gradients (views `p`, `g`), the point-to-point engine that runs
    a schedule, and the record of what ran when (`trace`) and how many micro-batch chunks were alive (`peak`).
    With `virtual` chunks, chunk v holds the blocks chunk_layers(...)[v]."""

    def __init__(self, gpt_cfg, stage, pp, p, g, parts=SINGLE, using=None, seq_len=None, dtype=None, virtual=1):
        self.gpt_cfg, self.stage, self.pp, self.p, self.g = gpt_cfg, stage, pp, p, g
        self.chunks = chunk_layers(gpt_cfg.n_layer, stage, pp.size, virtual)
        self.first, self.last = stage == 0, stage == pp.size - 1
        self.parts = parts                                    # 06_3d passes tensor-parallel ones
        self.evaluating = evaluation_parts(parts)             # forwards no backward follows
        self.using = using or (_no_hook, _no_hook)            # (forward, backward) hooks: 06_3d's ZeRO-3
        self.seq_len = seq_len or gpt_cfg.block_size              # positions of the activations sent between stages
        self.dtype = dtype or next(iter(p.values())).dtype    # ZeRO-3's `p` is empty between parts
        self.trace, self.peak = [], 0

    def run(self, ops, x, y, scale=1.0, grads_ready=None, finish_each=None):
        """Execute `ops` on the M micro-batches x[m], y[m] (token ids; every stage has them, only the ends read
        them), the loss's gradient scaled by `scale` / M. The last backward of each chunk (its last W, if the
        weight gradients are deferred) gets the `grads_ready` hook (see common.model.stage_backward): data
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
                                               scale / M if last else grad_out.pop((m, c)), hook, self.using[1], queue)
                if deferred and self.parts.hold:
                    self.parts.hold(queued_operands(queue))          # the output gradients W will read
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

def bubble(trace, step_time):
    """Fraction of the step's wall time (from the common start) this stage spent computing nothing: in no
    forward, backward or weights."""
    busy = sum(end - start for op, _, _, start, end in trace if op in ("forward", "backward", "weights"))
    return 1.0 - busy / step_time


def bubble_formula(kind, M, pp_size, virtual=1, costs=(1.0, 1.0, 1.0)):
    """The idle fraction of a step on P equal stages (M >= P): (P-1) slots of a forward + backward left idle
    among M+P-1 for afab and 1f1b, the slots V times thinner when interleaved; zb-h1, from the `costs`
    (F, B, W) of a forward, an input-gradient backward and a weight-gradient pass, fills P-1 of them with
    W, leaving (P-1)(F+B-W) idle of M(F+B+W) + that. (The Playbook and Megatron divide the idle time by the
    ideal time instead, M(F+B+W): (P-1)/M for 1f1b, (P-1)/(V M) interleaved.)"""
    P, V = pp_size, virtual
    if kind == "interleaved":
        return (P - 1) / (V * M + P - 1)
    if kind == "zb-h1":
        f, b, w = costs
        idle = (P - 1) * (f + b - w)
        return idle / (M * (f + b + w) + idle)
    return (P - 1) / (M + P - 1)


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
    for part, flat in zip(("params", "adam_m", "adam_v"), flats):
        buf = np.empty(starts[-1], flat.dtype) if root in (None, comm.rank) else None
        if root is None:
            comm.allgather(flat, buf, counts)
        else:
            comm.gather(flat, buf, counts, root)
        if buf is not None:
            state[part] = {}
            for s in range(comm.size):                          # wte: the first stage's copy (both are equal)
                views = stage_layout(gpt_cfg, s, comm.size, virtual).views(buf[starts[s]:starts[s + 1]])
                for name, view in views.items():
                    state[part].setdefault(name, view)
    return state or None
