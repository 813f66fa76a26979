"""Process settings for fast CPU runs: glibc's allocator told to keep freed memory.

A training step of the memory allocates and frees many tensors of a few MiB (the rows a
chunk reads, their updates and gradients). glibc serves such blocks with fresh ``mmap``s
or trims them off the top of its heap when they are freed, so the next step touches new
pages again: on a 2-core CPU the page faults cost about a quarter of a FwPKM layer's step
(146 -> 103 ms at 128^2 slots, 183 -> 142 ms at 1024^2, the benchmark's layer shape). Raising
the mmap and trim thresholds keeps freed blocks for reuse; the resident set then stays at
its peak instead of shrinking between steps.

Every ``fwpkm`` command calls :func:`tune_allocator` at start-up; set
``FWPKM_MALLOC=default`` to keep glibc's own settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MALLOC_ENV = "FWPKM_MALLOC"
MALLOC_MODES = ("tuned", "default")

# mallopt(3) parameters and the values set: blocks below 32 MiB (glibc's largest mmap
# threshold) come from the heap, and up to 1 GiB of free heap top is kept, not trimmed.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
TUNED_SETTINGS = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20}


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it (musl does not)
        return libc
    except (OSError, AttributeError):
        return None


def tune_allocator(mode: str | None = None) -> bool:
    """Apply :data:`TUNED_SETTINGS` through ``mallopt`` (``mode`` default: ``$FWPKM_MALLOC``,
    else ``"tuned"``). Returns whether they were applied: False for ``"default"`` and where
    the C library is not glibc."""
    source = "malloc mode" if mode is not None else MALLOC_ENV
    mode = os.environ.get(MALLOC_ENV, "tuned") if mode is None else mode
    if mode not in MALLOC_MODES:
        raise ValueError(f"{source}={mode!r}: expected one of {MALLOC_MODES}")
    libc = _glibc() if mode == "tuned" else None
    if libc is None:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in TUNED_SETTINGS.items())
