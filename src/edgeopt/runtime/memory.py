"""Give freed memory back to the operating system while large models are processed.

glibc serves big allocations with ``mmap`` and returns them with ``munmap``,
but after the first such block is freed it raises its threshold to that
block's size (up to 32 MiB), so every later weight-sized block comes from the
heap, where freed space is kept for reuse and counts in the process's RSS.
A pass that replaces each weight of a ResNet-18 (BatchNorm folding), or an
ONNX Runtime session that allocates and frees activation buffers run after
run, then holds tens of megabytes it no longer uses: 60-110 MB of the peak
RSS of a ResNet-18 quantization.

:func:`return_freed_memory` pins the threshold at 1 MiB: blocks of 1 MiB and
more are mapped and unmapped, smaller ones come from the heap as usual. It
acts once per process, only on glibc, and is a no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
import logging

__all__ = ["MMAP_THRESHOLD_BYTES", "return_freed_memory"]

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded in this process, libc's among them
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def return_freed_memory() -> bool:
    """Pin glibc's mmap threshold (once per process); True when it applied."""
    libc = _libc()
    if libc is None:
        return False
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    logger.debug("glibc mmap threshold pinned at %d bytes: %s", MMAP_THRESHOLD_BYTES, applied)
    return applied

