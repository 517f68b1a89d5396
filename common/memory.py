"""Memory: what a run will need, checked before it is spent, and the allocator tuned for NumPy's temporaries.

The estimate counts what the layers (common/layers.py) and AdamW allocate (see `estimate`); each chapter says
what its ranks hold. The allocator: every `a * b` of a training step allocates a fresh array. glibc serves blocks
above its mmap threshold (128 KiB at first, 32 MiB at most) with new pages from the kernel and unmaps them
on free, so the next temporary pays one page fault per 4 KiB all over again: measured here, ~40 % of a
single-core step of the CPU config and ~10 % of the baby GPT's. Serving every block from the heap and never
trimming it keeps those pages mapped, so a step reuses the memory the previous step freed; the heap settles at
the step's peak.
"""
import ctypes
import dataclasses
import ctypes.util
import os
import resource
import sys
import weakref
from collections import defaultdict
from pathlib import Path

import numpy as np

from common.config import ConfigError, flag
from common.moe import capacity
from common.precision import is_sixteen

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes a C int: the largest, i.e. never trim in practice


def reuse_freed_memory():
    """Tune glibc malloc as described above (a no-op elsewhere); returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError, TypeError):  # not glibc (musl has no mallopt)
        return False


# ----------------------------------------------------------------------------- the memory a run will need

MiB, GiB = 2 ** 20, 2 ** 30


def activation_bytes(gpt_cfg, rows, blocks, first=True, last=True, tp_size=1, sp=False, itemsize=4,
                     recompute="none", cp_size=1, cp_mode="ring", dispatched=None, ep_size=1):
    """Bytes the forward of one micro-batch of `rows` keeps for its backward: the caches of `blocks` blocks
    (and of the head if `last`), as common/model.py builds them, on one of `tp_size` tensor-parallel and
    `cp_size` context-parallel ranks; the floating-point arrays, as the token ids are the batch's. With Tq = T/cp
    the positions a rank holds and Tl = Tq (Tq/tp with sp), per block and row:
        none       2 Tl C   LayerNorm xhat (two)            2 Tl     their rstd
                   2 Tl C   the inputs of c_attn and c_fc (under sp the rank's part of the sequence, as Megatron
                            keeps it: the backward gathers it again)
                   16 Tq C / tp  the split parts: qkv (3C), the attention output (C), c_fc's output, GELU's
                                 tanh and output (3 x 4C)
                   nh T T / tp   the attention probabilities (with cp > 1 none: ring attention keeps their
                                 log-sum-exp, nh Tq / tp; Ulysses those of its nh / (tp cp) heads, nh T T / (tp cp))
        selective  the same without the probabilities, recomputed in the backward
        full       Tl C     the block's input alone
    and the head's: ln_f xhat (Tl C) and rstd (Tl), its output (Tl C), the probabilities (Tq V / tp, padded).
    Under sp every term is the rank's 1/tp but the head's padding: sbh(34/t + 5as/ht) in Korthikanti et al.'s
    count, where tp alone keeps sbh(10 + 24/t + 5as/ht).
    With E experts the MLP's 12 T C become the router's probabilities T E, C per assignment the rank sends (the
    expert's output, which its gate weighs) and 13 C per assignment its experts compute (the input, GELU's input,
    tanh and output): `dispatched` (sent, computed) in all (one number: both), or as many as the capacity allows,
    min(T k, E ceil(f T k / E)) sent per row, and computed for ep ranks' rows, min(ep T k, E ceil(f T k / E))."""
    T, C, nh, V = gpt_cfg.block_size, gpt_cfg.n_embd, gpt_cfg.n_head, gpt_cfg.vocab_size
    t, E = tp_size, gpt_cfg.n_experts
    Tq = T // cp_size
    Tl = Tq // t if sp else Tq
    ring = cp_size > 1 and cp_mode == "ring"
    scores = 0 if ring else nh * T * T // (t * cp_size)
    whole = 4 * Tl * C + 2 * Tl + 16 * Tq * C // t + (nh * Tq // t if ring else scores)
    if E and recompute != "full":
        k, most = gpt_cfg.top_k, E * capacity(T, gpt_cfg)
        if dispatched is None:
            dispatched = rows * blocks * min(T * k, most), rows * blocks * min(ep_size * T * k, most)
        sent, computed = (dispatched, dispatched) if np.isscalar(dispatched) else dispatched
        whole += T * E - 12 * T * C
        extra = C * sent + 13 * C * computed
    else:
        extra = 0
    block = {"none": whole, "selective": whole - scores, "full": Tl * C}[recompute]
    head = (2 * Tl * C + Tl + Tq * -(-V // t)) if last else 0
    return (rows * (blocks * block + head) + extra) * itemsize


def recompute_bytes(gpt_cfg, rows, tp_size=1, sp=False, itemsize=4, recompute="none", cp_size=1, cp_mode="ring"):
    """What full recomputation holds beside the kept inputs: one block's whole cache of one micro-batch, which
    the backward rebuilds (and the forward makes and drops) one block at a time; 0 otherwise. A working set, not
    a kept cache, so it is estimated apart from the activations the caches are measured to hold."""
    if recompute != "full":
        return 0
    return activation_bytes(gpt_cfg, rows, 1, last=False, tp_size=tp_size, sp=sp, itemsize=itemsize,
                            cp_size=cp_size, cp_mode=cp_mode)


def temporary_bytes(gpt_cfg, rows, tp_size=1, itemsize=4):
    """The largest transient arrays of a step beyond the caches: the logits with their shifted copy in the
    loss, or attention's backward (two score-sized arrays per chunk of rows and the qkv gradient), or GELU's
    backward (of every assignment the experts compute, with experts), plus a few (rows, T, C) gradients in flight."""
    T, C, nh, V = gpt_cfg.block_size, gpt_cfg.n_embd, gpt_cfg.n_head, gpt_cfg.vocab_size
    t, e = tp_size, itemsize
    mlp_rows = min(T * gpt_cfg.top_k, gpt_cfg.n_experts * capacity(T, gpt_cfg)) if gpt_cfg.n_experts else T
    scores_row = nh / t * T * T * e                                          # one row's (heads, T, T)
    chunk = min(rows, max(1, MiB // max(1, int(scores_row))))                # layers.chunks' rows
    largest = max(2 * rows * T * V / t * e, 2 * chunk * scores_row + 3 * rows * T * C / t * e,
                  2 * rows * mlp_rows * 4 * C / t * e)
    return int(largest + 4 * rows * T * C * e)


def estimate(gpt_cfg, widths, *, params, grads, optimizer, rows, blocks, first=True, last=True, tp_size=1,
             sp=False, recompute="none", activations=None, whole=None, cp_size=1, cp_mode="ring"):
    """{kind: bytes} one rank will hold at its peak: `params`, `grads` and `optimizer` are element counts
    (AdamW keeps m, v and a work array of `optimizer` elements, in mixed precision also the float32 master and
    gradient), `widths` their bytes per element (common.precision.widths); one micro-batch of `rows` rows at a time
    keeps its activations (activation_bytes), or, from a pipeline's schedule, `activations`; full recomputation
    rebuilds one block's cache at a time (recompute_bytes). `whole`: the model's element count, where a rank
    keeps less of it: each rank draws the whole initialisation before it keeps its part, and a checkpoint
    gathers the whole state (parameters, m and v) where it is written. Neither is freed to the system (the
    heap is kept, see reuse_freed_memory), so both count."""
    e, act = widths.work, widths.activations
    if activations is None:
        activations = activation_bytes(gpt_cfg, rows, blocks, first, last, tp_size, sp, act, recompute)
    whole = whole or params
    return {"parameters": params * widths.weights, "gradients": grads * widths.grads,
            "optimizer": optimizer * (widths.state + widths.scratch), "activations": activations,
            "recomputation": recompute_bytes(gpt_cfg, rows, tp_size, sp, act, recompute, cp_size, cp_mode),
            "temporaries": temporary_bytes(gpt_cfg, rows, tp_size, e),
            "initialisation": whole * e if params < whole else 0,
            "checkpoint": 3 * whole * e if optimizer < whole else 0}


# ----------------------------------------------------------------------------- the memory a run holds

class Transient:
    """Arrays that live for part of a step (gathered weights, gradient buckets, the activations a forward keeps
    for its backward), tracked by weak reference and summed by kind: an array counts for as long as anything
    still holds it, so a forgotten reference shows up in the peak."""

    def __init__(self):
        self.alive, self.peak = {}, defaultdict(int)             # id of an array -> (kind, weak reference)

    def new(self, kind, size, dtype, zeroed=False):
        """A new array of `size` elements, tracked as `kind`."""
        buf = (np.zeros if zeroed else np.empty)(size, dtype)
        self._track(kind, [buf])
        return buf

    def hold(self, kind, obj):
        """Track as `kind` every floating-point array in `obj` (nested tuples and lists, such as a cache), each
        counted once through the array that owns its memory."""
        found, todo = [], [obj]
        while todo:
            item = todo.pop()
            if isinstance(item, np.ndarray):
                while isinstance(item.base, np.ndarray):
                    item = item.base
                if item.dtype.kind in "fc" or is_sixteen(item.dtype):      # bfloat16's kind is "V"
                    found.append(item)
            elif isinstance(item, (tuple, list)):
                todo.extend(item)
        self._track(kind, found)

    def _track(self, kind, arrays):
        self.alive = {key: (k, ref) for key, (k, ref) in self.alive.items() if ref() is not None}
        for a in arrays:
            self.alive.setdefault(id(a), (kind, weakref.ref(a)))
        now = self.held_by_kind()
        for k, nbytes in now.items():
            self.peak[k] = max(self.peak[k], nbytes)
        self.peak["total"] = max(self.peak["total"], sum(now.values()))

    def held_by_kind(self):
        now = defaultdict(int)
        for k, ref in self.alive.values():
            a = ref()
            if a is not None:
                now[k] += a.nbytes
        return now

    def held(self, kind=None):
        """Bytes still alive (of one kind, or of all)."""
        now = self.held_by_kind()
        return now[kind] if kind else sum(now.values())


def available_bytes():
    """Memory this host can still give, from the kernel (Linux), narrowed by a container's limit; None if
    unknown."""
    found = []
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        found.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _status_kib(field):
    """A field of /proc/self/status in bytes (Linux), else None."""
    try:
        return int(Path("/proc/self/status").read_text().split(field + ":")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return None


def peak_rss():
    """This process's peak resident memory in bytes: the kernel's high-water mark of its pages (Linux), else
    getrusage's ru_maxrss, which Linux carries over from a parent that forked (KiB there, bytes on macOS)."""
    peak = _status_kib("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak if sys.platform == "darwin" else peak * 1024
    return peak


def resident():
    """The memory this process has resident now, in bytes: before a run allocates anything, what the interpreter,
    NumPy, BLAS and MPI take (its runtime); the peak so far where the system does not say."""
    now = _status_kib("VmRSS")
    return now if now is not None else peak_rss()


def size(nbytes):
    for unit, scale in (("TiB", 2 ** 40), ("GiB", GiB)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / MiB:.1f} MiB"


class Budget:
    """One rank's estimate beside the memory of its host; what the banner says before a run and the last line
    says after it (the peak resident memory, measured, and how much of it came after start-up)."""

    def __init__(self, estimate, host_total, available):
        self.estimate, self.host_total, self.available = estimate, host_total, available
        self.start_rss = estimate.get("runtime", peak_rss())

    @property
    def total(self):
        return sum(self.estimate.values())

    def banner(self, whose="per rank"):
        parts = ", ".join(f"{kind} {size(b)}" + (" measured" if kind == "runtime" else "")
                          for kind, b in self.estimate.items() if b)
        room = f"; {size(self.available)} available on this host" if self.available is not None else ""
        return f"memory: ~{size(self.total)} {whose} estimated ({parts}){room}"

    def summary(self, activations=None):
        """The last line of a run; `activations`: the peak bytes its caches held (Transient.peak), measured."""
        peak = peak_rss()
        held = (f"; activations: peak {activations / MiB:.1f} MiB held by the caches, "
                f"{self.estimate['activations'] / MiB:.1f} MiB by the formula" if activations is not None else "")
        return (f"memory: peak {size(peak)} resident on rank 0, {size(max(0, peak - self.start_rss))} of it after "
                f"start-up, against {size(self.total)} estimated{held}")


SHRINKS = {"state": ("n_layer", "n_embd"), "activations": ("batch_size", "block_size", "n_layer", "n_embd")}


def remedy(configs, grows, also=""):
    """The flags that shrink `grows` ("state" or "activations"), the one furthest above its default first (the
    one that made the run too big), as advice; `also`: the chapter's other ways, e.g. "raise --tp"."""
    def field(name):
        cfg = next(c for c in configs if hasattr(c, name))
        default = next(f.default for f in dataclasses.fields(cfg) if f.name == name)
        return getattr(cfg, name), default

    names = sorted(SHRINKS[grows], key=lambda name: field(name)[0] / field(name)[1], reverse=True)
    value, default = field(names[0])
    ways = [f"lower --{flag(names[0])} (it is {value}, the default {default}) or "
            + ", ".join(f"--{flag(name)}" for name in names[1:])]
    train_cfg = next((c for c in configs if hasattr(c, "recompute")), None)
    if grows == "activations" and train_cfg is not None and train_cfg.recompute != "full":
        ways.append("use --recompute full")
    return ", or ".join(ways + ([also] if also else []))


def check_fits(estimate, host, configs, also=""):
    """The Budget of this rank, or a ConfigError naming the flag to change when the ranks on this host
    (`host`: their Comm) would together need more memory than the host has available. The estimate is the
    chapter's (`estimate`) on top of the runtime this rank holds already, measured. Every rank on the host
    must call it (it sums the estimates over them). `configs`: the run's (GPTConfig, TrainConfig), whose flags
    the advice names; `also`: the chapter's other ways to shrink the model state."""
    estimate = {"runtime": resident(), **estimate}
    mine = np.array([float(sum(estimate.values()))])
    total = float(host.allreduce(mine)[0]) if host is not None else float(mine[0])
    available = available_bytes()
    budget = Budget(estimate, total, available)
    if available is not None and total > available:
        activations = estimate["activations"] + estimate["recomputation"] + estimate["temporaries"]
        biggest = max((kind for kind in estimate if kind != "runtime"), key=estimate.get)
        fix = remedy(configs, "activations" if activations >= budget.total / 2 else "state", also)
        ranks = host.size if host is not None else 1
        together = f", {size(total)} for the {ranks} ranks on this host," if ranks > 1 else ""
        raise ConfigError(f"this run needs about {size(budget.total)} per rank ({biggest}: "
                          f"{size(estimate[biggest])}){together} but only {size(available)} is available; {fix}")
    return budget
