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

What the trim alone left (issue 22): inside a layer, freed temporaries still sat in the heap until the
trim, so a layer's peak held its live tensors plus whatever free chunks the heap's layout could not reuse;
that layout differs from layer to layer (the heap's address space wandered from 410 to 670 MiB over 18
layers of a hidden-1024 OPT), so layer peaks spread over 760-880 MiB and the deepest runs drew the worst
ones. :func:`map_large_blocks` fixes the mmap threshold at 1 MiB, which also switches glibc's dynamic
adjustment off: every block of 1 MiB or more (weights, Hessians, activations) gets its own mapping and goes
back to the OS the moment it is freed, so a layer's peak is its live tensors, the same for every layer
(611-622 MiB on that model). See ``docs/quantize-memory.md`` for the measurements.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)

#: Allocations of this many bytes or more get a mapping of their own (see :func:`map_large_blocks`).
LARGE_BLOCK_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    trim = getattr(_libc(), "malloc_trim", None)  # None: no C library found, or not glibc
    if trim is None:
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


def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """From now on, serve every allocation of ``threshold`` bytes or more with its own mapping (glibc
    ``mallopt(M_MMAP_THRESHOLD)``), returned to the OS as soon as it is freed.

    This is process-wide and stays in force after the quantizer returns (glibc cannot switch its dynamic
    threshold back on); it costs page faults on fresh blocks, not memory. Returns False where unavailable
    (not glibc) or refused.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    if not done:
        logger.debug("mallopt(M_MMAP_THRESHOLD, %d) refused; large blocks stay on the heap", threshold)
    return done


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
