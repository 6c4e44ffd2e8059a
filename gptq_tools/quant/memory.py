"""Give freed host memory back to the operating system between layers.

Why the quantizer's memory grew with depth: not a reference held (every finished layer's tensors are
freed; ``gc`` finds no tensor in a reference cycle), but glibc's allocator. PyTorch's CPU tensors come
from ``malloc``; glibc serves large blocks with ``mmap`` and returns them on ``free``, but every time
such a block is freed it raises its "mmap threshold" to that block's size (up to 32 MiB on 64-bit).
From then on the per-layer temporaries of that size (fp32 copies of a weight, Hessians, activations)
are carved from the heap instead, and a heap with live blocks above the freed ones cannot shrink: the
resident anonymous memory ratchets up, layer after layer. ``malloc_trim(0)`` releases the free pages
inside the heap (``madvise(MADV_DONTNEED)``), so after each layer the process is back to its constant
base. Other C libraries (musl) or platforms without it: nothing to do, the call is skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS (glibc ``malloc_trim``); False where unavailable."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def anonymous_bytes(pid: int | str = "self") -> int | None:
    """Resident anonymous memory of a process (``/proc/PID/smaps_rollup``), or None where unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
