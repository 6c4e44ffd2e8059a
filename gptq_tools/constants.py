"""Environment variables and defaults, read in this one module."""

from __future__ import annotations

import os
from pathlib import Path

#: Default chunk size for streaming file I/O and hashing (16 MiB: large enough for hashlib to release
#: the GIL and for the kernel to read ahead, small enough to keep two buffers in flight cheaply).
IO_CHUNK_BYTES = 16 * 1024 * 1024

#: Largest byte count handed to one ``copy_file_range`` call (some glibc versions misreport > INT_MAX).
COPY_FILE_RANGE_MAX = 1024 * 1024 * 1024

#: Largest checksum manifest read (64 MiB, about 800,000 lines): a manifest is a short text file, so
#: anything larger (``/dev/zero``, a weights file given by mistake) is refused before it fills memory.
MANIFEST_MAX_BYTES = 64 * 1024 * 1024


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip().lower() in {"1", "true", "yes", "on"}


def progress_disabled() -> bool:
    """Whether progress bars are switched off (``GPTQ_TOOLS_DISABLE_PROGRESS`` or ``HF_HUB_DISABLE_PROGRESS_BARS``)."""
    for name in ("GPTQ_TOOLS_DISABLE_PROGRESS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        flag = _env_flag(name)
        if flag is not None:
            return flag
    return False


def configs_dir() -> Path | None:
    """``GPTQ_TOOLS_CONFIGS``: a folder whose ``presets/`` replaces the presets shipped in the package.

    None when it is not set (see :func:`gptq_tools.presets.presets_dir`).
    """
    override = os.environ.get("GPTQ_TOOLS_CONFIGS")
    return Path(override) if override else None


def kill_at_step() -> int | None:
    """Test hook: ``GPTQ_TOOLS_KILL_AT_STEP=N`` SIGKILLs the process right after its N-th publishing step.

    Publishing steps are the renames, unlinks and tree removals that change what is at a final name
    (see :func:`gptq_tools.fileio.publish_step`). Kill-at-each-step tests use it to prove that a rerun
    repairs a run killed at any of them.
    """
    value = os.environ.get("GPTQ_TOOLS_KILL_AT_STEP", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def step_log_path() -> Path | None:
    """Test hook: ``GPTQ_TOOLS_STEP_LOG=FILE`` appends one line per publishing step (``KIND PATH``)."""
    value = os.environ.get("GPTQ_TOOLS_STEP_LOG")
    return Path(value) if value else None


def triton_interpret() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``; correctness tests only)."""
    return bool(_env_flag("TRITON_INTERPRET"))
