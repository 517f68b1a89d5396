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
import ctypes.util
import os
import resource
import sys
from pathlib import Path

import numpy as np

from common.config import ConfigError

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


def activation_bytes(gpt_cfg, rows, blocks, first=True, last=True, tp_size=1, sp=False, itemsize=4):
    """Bytes the forward of one micro-batch of `rows` keeps for its backward: the caches of `blocks` blocks
    (and of the head if `last`), as common/model.py builds them, on one of `tp_size` tensor-parallel ranks.
    Per block: LayerNorm xhat and the inputs of c_attn and c_fc (replicated; split by sp), and the split parts
    qkv (3C), the attention output (C), the MLP's c_fc output, GELU's tanh and output (3 x 4C), and the
    (heads x T x T) attention probabilities."""
    T, C, nh, V = gpt_cfg.block_size, gpt_cfg.n_embd, gpt_cfg.n_head, gpt_cfg.vocab_size
    t = tp_size
    replicated = 2 * T * C / t + 2 * T * C if sp else 4 * T * C            # two xhat, two linear inputs
    block = replicated + 16 * T * C / t + nh * T * T / t + 2 * T             # + the two rstd (T, 1)
    head = (2 * T * C + T + T * V / t) if last else 0                        # ln_f xhat and output, the probs
    return int(rows * (blocks * block + head) * itemsize)


def temporary_bytes(gpt_cfg, rows, tp_size=1, itemsize=4):
    """The largest transient arrays of a step beyond the caches: the logits with their shifted copy in the
    loss, or attention's backward (two score-sized arrays per chunk of rows and the qkv gradient), or GELU's
    backward, plus a few (rows, T, C) gradients in flight."""
    T, C, nh, V = gpt_cfg.block_size, gpt_cfg.n_embd, gpt_cfg.n_head, gpt_cfg.vocab_size
    t, e = tp_size, itemsize
    scores_row = nh / t * T * T * e                                          # one row's (heads, T, T)
    chunk = min(rows, max(1, MiB // max(1, int(scores_row))))                # layers.chunks' rows
    largest = max(2 * rows * T * V / t * e, 2 * chunk * scores_row + 3 * rows * T * C / t * e,
                  2 * rows * T * 4 * C / t * e)
    return int(largest + 4 * rows * T * C * e)


def estimate(gpt_cfg, itemsize, *, params, grads, optimizer, rows, blocks, first=True, last=True, alive=1,
             tp_size=1, sp=False):
    """{kind: bytes} one rank will hold at its peak: `params`, `grads` and `optimizer` are element counts
    (AdamW keeps m, v and a work array of `optimizer` elements); `alive` micro-batches of `rows` rows each
    keep their activations at once."""
    return {"parameters": params * itemsize, "gradients": grads * itemsize, "optimizer": 3 * optimizer * itemsize,
            "activations": alive * activation_bytes(gpt_cfg, rows, blocks, first, last, tp_size, sp, itemsize),
            "temporaries": temporary_bytes(gpt_cfg, rows, tp_size, itemsize)}


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


def peak_rss():
    """This process's peak resident memory in bytes: the kernel's high-water mark of its pages (Linux), else
    getrusage's ru_maxrss, which Linux carries over from a parent that forked (KiB there, bytes on macOS)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


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
        self.start_rss = peak_rss()

    @property
    def total(self):
        return sum(self.estimate.values())

    def banner(self, whose="per rank"):
        parts = ", ".join(f"{kind} {size(b)}" for kind, b in self.estimate.items() if b)
        room = f"; {size(self.available)} available on this host" if self.available is not None else ""
        return f"memory: ~{size(self.total)} {whose} estimated ({parts}){room}"

    def summary(self):
        peak = peak_rss()
        return (f"memory: peak {size(peak)} resident on rank 0, {size(max(0, peak - self.start_rss))} of it after "
                f"start-up, against {size(self.total)} estimated")


def check_fits(estimate, host, state_hint="--n-layer or --n-embd"):
    """The Budget of this rank, or a ConfigError naming the flag to change when the ranks on this host
    (`host`: their Comm) would together need more memory than the host has available. Every rank on the host
    must call it (it sums the estimates over them)."""
    mine = np.array([float(sum(estimate.values()))])
    total = float(host.allreduce(mine)[0]) if host is not None else float(mine[0])
    available = available_bytes()
    budget = Budget(estimate, total, available)
    if available is not None and total > available:
        activations = estimate["activations"] + estimate["temporaries"]
        biggest = max(estimate, key=estimate.get)
        fix = "lower --batch-size or --block-size" if activations >= budget.total / 2 else f"lower {state_hint}"
        ranks = host.size if host is not None else 1
        together = f", {size(total)} for the {ranks} ranks on this host," if ranks > 1 else ""
        raise ConfigError(f"this run needs about {size(budget.total)} per rank ({biggest}: "
                          f"{size(estimate[biggest])}){together} but only {size(available)} is available; {fix}")
    return budget
