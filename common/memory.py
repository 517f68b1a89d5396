"""Let the C allocator keep freed NumPy temporaries for reuse instead of handing them back to the kernel.

Every `a * b` of a training step allocates a fresh array. glibc serves blocks above its mmap threshold
(128 KiB at first) with new pages from the kernel and unmaps them on free, so the next temporary pays one
page fault per 4 KiB all over again: measured here, that was ~40 % of a single-core step. Raising the
thresholds keeps those blocks in the heap, where the next step finds them warm.
"""
import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit; larger blocks are still mapped afresh


def reuse_freed_memory():
    """Tune glibc malloc (a no-op elsewhere); returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError, TypeError):  # not glibc (musl has no mallopt)
        return False
