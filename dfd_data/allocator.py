"""Keeping freed activation memory in the process for the next inference call or training step.

glibc's malloc serves large blocks with fresh pages from the kernel and returns them on
free: every block above its mmap threshold (at most 32 MiB by default), and in practice
torch's aligned allocations of a few MiB too. One 512 px activation of 64 channels is 32 MiB
in bf16, so every layer of every call paid for faulting in and zeroing new pages (HED at
batch 4: 166K page faults a call; ten 512 px training steps: 11M). Raising the mmap and
trim thresholds keeps those blocks in the heap, where the next call reuses them; the process
keeps its peak memory instead of giving it back between calls.

Elsewhere (another C library, or no mallopt) nothing changes: the work is the same, only
slower, so there is nothing to report.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and stay there once freed.
HEAP_BLOCK_LIMIT = 1 << 30


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when it took effect."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)) \
        and bool(mallopt(_M_TRIM_THRESHOLD, 2 * HEAP_BLOCK_LIMIT - 1))


__all__ = ["HEAP_BLOCK_LIMIT", "keep_freed_memory"]
