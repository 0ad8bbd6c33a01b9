"""Keep freed memory for reuse: glibc's malloc settings for a server's steady allocations.

Every request allocates the same large buffers: a 224 x 224 row is 600 KB of float32, its
index temporaries as much again, and a batch of 32 rows 19 MB. Past glibc's mmap threshold
(128 KiB to start with) each is a fresh ``mmap``, and every page of it is faulted in again
on first touch, then unmapped on free. glibc raises the threshold after such a free, but
not reliably: a front end of ``--workers 2`` was measured faulting in 360 pages per
request, 0.7 ms of a lone request's 3 ms. With a fixed threshold above the largest batch,
and a trim threshold above it, freed buffers stay in the heap and are reused, untouched by
the kernel. The cost is memory a process keeps after a burst (at most about the trim
threshold per malloc arena), which it reuses for the next one.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
"""Allocations below this come from the heap: a batch of 64 rows of 224 px is 38 MB."""
TRIM_THRESHOLD = 128 << 20
"""Free memory at the top of a heap is returned to the OS only beyond this."""


def keep_freed_memory() -> bool:
    """Apply the thresholds to this process's malloc; False where it is not glibc's."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    applied = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and applied
    if not applied:
        log.warning("malloc's thresholds could not be set: large buffers are mapped per use")
    return applied
