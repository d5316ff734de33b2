"""glibc malloc settings for processes that move large short-lived buffers (KV records).

By default glibc serves each allocation above ~128 KiB with a fresh `mmap` and gives memory
back to the kernel as soon as the top of the heap is free, so every received 0.4 MiB layer
record lands in new pages: the page faults (and the kernel zeroing them) cost more CPU than
the copy itself and halved read throughput. Raising both thresholds keeps freed buffers for
reuse; the retained free memory is bounded by the trim threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)
_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest dynamic threshold
TRIM_THRESHOLD_BYTES = 128 << 20


def tune_malloc() -> bool:
    """Applies the thresholds to this process; False (and nothing changes) off glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): their allocators decide for themselves
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and ok
    log.debug("malloc thresholds %s", "set" if ok else "refused")
    return ok
