"""Let the C allocator keep freed NumPy temporaries for reuse instead of handing them back to the kernel.

Every `a * b` of a training step allocates a fresh array. glibc serves blocks above its mmap threshold
(128 KiB at first, 32 MiB at most) with new pages from the kernel and unmaps them on free, so the next
temporary pays one page fault per 4 KiB all over again: measured here, ~40 % of a single-core step of the
CPU config and ~10 % of the baby GPT's. Serving every block from the heap and never trimming it keeps
those pages mapped, so a step reuses the memory the previous step freed; the heap settles at the step's peak.
"""
import ctypes
import ctypes.util
import sys

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
