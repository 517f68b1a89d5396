"""Pipeline schedules as data: for every stage, the list of instructions one training step runs, the checker
that proves a schedule a valid program, and a simulator of it on ideal stages. No MPI here: the engine in
pipeline.py runs these lists, and the notebook, the tests and the figures draw and check them.

    afab         all M forwards, then all M backwards (GPipe): M micro-batches' activations alive at the peak
    1f1b         P-1-s warm-up forwards, then one forward, one backward, ...: at most P - s alive on stage s
    interleaved  1f1b over V chunks of layers per stage (Megatron's virtual pipeline): each idle slot V times
                 thinner, for V times the point-to-point messages and more activations alive
    zb-h1        1f1b whose backward computes only the input gradient (B), the weight gradients (W) run
                 later, in what were idle slots (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024)

afab and 1f1b leave each stage idle for (P-1) forward+backward slots of the M+P-1 in a step: the bubble
fraction (P-1)/(M+P-1), if every stage takes the same time per micro-batch; interleaved (P-1)/(VM+P-1);
zb-h1 (P-1)(F+B-W)/(M(F+B+W)+(P-1)(F+B-W)) for a forward F, B and W. A schedule that cannot run as asked (sizes
that break its rules, an invalid program, a deadlock) raises ScheduleError.
"""
import functools

import numpy as np

from common.config import ConfigError

SCHEDULES = ("afab", "1f1b", "interleaved", "zb-h1")


class ScheduleError(ConfigError):
    """A schedule that cannot run as asked: its sizes break a rule, or its program is invalid or deadlocks."""


# ----------------------------------------------------------------------------- which blocks each stage runs

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



# ----------------------------------------------------------------------------- the instructions of a step

def require(ok, message):
    """A rule of schedules: raise ScheduleError(message) unless `ok`."""
    if not ok:
        raise ScheduleError(message)


def check_schedule_args(kind, M, pp_size, virtual):
    """The rules a schedule's sizes must follow, as ValueError."""
    if kind not in (*SCHEDULES, "forward"):
        raise ScheduleError(f"unknown schedule {kind!r}: one of {', '.join(SCHEDULES)}")
    if (kind == "interleaved") != (virtual > 1) and kind != "forward":
        raise ScheduleError("the interleaved schedule needs 2 or more virtual stages per rank, and only it runs them"
                         if kind == "interleaved" else f"the {kind} schedule runs one chunk per stage, not {virtual}")
    if virtual > 1 and M % pp_size:
        raise ScheduleError(f"the interleaved schedule sends micro-batches in groups of the {pp_size} stages: "
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
                 micro-batch i - s follow the backward of micro-batch i, the rest at the end (Qi et al., ICLR 2024)
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
            raise ScheduleError(f"{kind} deadlocks at M={M}, P={P}, V={V}: stages wait at instructions {pc}")
    return traces


def check_schedule(kind, M, pp_size, virtual=1):
    """Prove one schedule a valid program on every stage, or raise ScheduleError naming the first rule broken:
    each micro-batch chunk forwarded once, its backward after its forward and its W (zb-h1) after its backward;
    each receive before the forward or backward that reads it and each send after the one that computes it;
    every receive matched by one send of its neighbour; no deadlock (simulate); the peak number of micro-batch
    chunks alive within alive_bound. Returns the peaks."""
    P, V = pp_size, virtual
    programs = [schedule(kind, M, s, P, V) for s in range(P)]
    sends, recvs = [], []
    for s, ops in enumerate(programs):
        where = {}
        for i, (op, m, c) in enumerate(ops):
            require((op, m, c) not in where, f"stage {s} runs {op} of micro-batch {m} chunk {c} twice")
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
                require(not missing, f"{kind} stage {s} never runs {missing} of micro-batch {m} chunk {c}")
                at = [where[op, m, c] for op, needed in steps if needed]
                require(at == sorted(at), f"{kind} stage {s} runs micro-batch {m} chunk {c}'s ops out of order")
        allowed = {op for op, _ in steps}
        extra = [(op, m, c) for op, m, c in ops if not (m < M and c < V and op in allowed)]
        require(not extra, f"{kind} stage {s} runs instructions it should not: {extra[:3]}")
    require(sorted(sends) == sorted(recvs), f"{kind}: the sends and receives do not match")
    peaks = [peak_alive(trace) for trace in simulate(kind, M, P, virtual=V, t_w=1.0)]
    bound = [alive_bound(kind, M, s, P, V) for s in range(P)]
    require(all(peak <= b for peak, b in zip(peaks, bound)), f"{kind}: peaks {peaks} above the bound {bound}")
    return peaks


# ----------------------------------------------------------------------------- what a schedule keeps alive, and idles

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


def activation_peak(kind, M, stage, pp_size, virtual, kept, deferred=None):
    """The most bytes of activations `stage` holds at once in one step of `schedule(kind, ...)`: each micro-batch
    chunk's cache, kept(chunk) bytes, from its forward to its backward, or where the weight gradients wait (zb-h1),
    deferred(chunk) bytes of it from there to its W. Counted at the moments the measurement counts
    (common.memory.Transient.hold): as each forward ends and as each backward queues its W."""
    kept = [kept(c) for c in range(virtual)]
    after = [deferred(c) if kind == "zb-h1" else 0 for c in range(virtual)]
    return max(sum(map(int.__mul__, counts, kept)) + sum(map(int.__mul__, waiting, after))
               for counts, waiting in alive_counts(kind, M, stage, pp_size, virtual))


@functools.lru_cache(maxsize=4096)
def alive_counts(kind, M, stage, pp_size, virtual=1):
    """Every distinct state of `stage` in one step: (micro-batches kept per chunk, waiting for their W per chunk),
    after each forward, backward and W. Remembered: the planner asks it of every stage of every layout."""
    cached, waiting, seen = [0] * virtual, [0] * virtual, {((0,) * virtual, (0,) * virtual)}
    for op, _, c in schedule(kind, M, stage, pp_size, virtual):
        if op == "forward":
            cached[c] += 1
        elif op == "backward":
            cached[c] -= 1
            waiting[c] += kind == "zb-h1"
        elif op == "weights":
            waiting[c] -= 1
        seen.add((tuple(cached), tuple(waiting)))
    return frozenset(seen)


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
