"""Environment variables and defaults, read in this one module."""

from __future__ import annotations

import os
from pathlib import Path

#: Default chunk size for streaming file I/O and hashing (16 MiB: large enough for hashlib to release
#: the GIL and for the kernel to read ahead, small enough to keep two buffers in flight cheaply).
IO_CHUNK_BYTES = 16 * 1024 * 1024

#: Largest byte count handed to one ``copy_file_range`` call (some glibc versions misreport > INT_MAX).
COPY_FILE_RANGE_MAX = 1024 * 1024 * 1024


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


def configs_dir() -> Path:
    """Folder holding presets (``GPTQ_TOOLS_CONFIGS`` overrides the repository's ``configs/``)."""
    override = os.environ.get("GPTQ_TOOLS_CONFIGS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "configs"
