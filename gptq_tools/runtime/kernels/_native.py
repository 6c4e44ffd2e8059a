"""Build a C file of this package into a shared library once, keep it in the cache, load it with ctypes.

A kernel whose loops no library ships (:mod:`.cpu_int4_native`) is written in C, compiled
on first use by the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) and cached under
:func:`gptq_tools.constants.native_cache_dir`, named by a hash of the source, the compiler and its flags:
a changed source or compiler builds a new file, and a build is published by an atomic rename, so
concurrent processes never load a half-written library. Nothing here raises on a missing compiler or a
failed build: :func:`load` returns the reason instead, and the kernel reports itself unsupported with it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from ... import constants
from ...errors import GptqToolsError
from ...files.fileio import atomic_path

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
#: Seconds one compiler run may take.
BUILD_TIMEOUT_S = 120


NO_COMPILER = "no C compiler found (install gcc or clang, e.g. apt-get install gcc, or set CC)"


@functools.cache
def _warn_no_compiler() -> None:
    """Once per process: the native kernels are off, and what would turn them on."""
    logger.warning("gptq-tools' native CPU kernels are off: %s; 4-bit layers run PyTorch's slower bf16 int4 op",
                   NO_COMPILER)


def _compiler() -> str | None:
    named = os.environ.get("CC")
    if named:
        return shutil.which(named) or named
    return next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


@functools.cache
def load(source: str, flags: tuple[str, ...]) -> ctypes.CDLL | str:
    """The library built from ``csrc/<source>`` with ``flags``, or why it could not be built or loaded."""
    path = SOURCE_DIR / source
    try:
        text = path.read_bytes()
    except OSError as exc:
        return f"its C source is missing ({path}: {exc.strerror}); reinstall gptq-tools"
    compiler = _compiler()
    if compiler is None:
        _warn_no_compiler()
        return NO_COMPILER
    key = hashlib.sha256(b"\0".join([text, compiler.encode(), " ".join(flags).encode()])).hexdigest()[:16]
    library = constants.native_cache_dir() / f"{path.stem}-{key}.so"
    if not library.is_file():
        reason = _build(compiler, path, flags, library)
        if reason is not None:
            return reason
    try:
        return ctypes.CDLL(str(library))
    except OSError as exc:
        return f"loading {library} failed ({exc}); delete it to rebuild"


def _build(compiler: str, source: Path, flags: tuple[str, ...], library: Path) -> str | None:
    logger.info("building %s with %s into %s", source.name, compiler, library)
    try:
        with atomic_path(library, force=True) as temp:
            command = [compiler, *flags, "-shared", "-fPIC", "-o", str(temp), str(source)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
                raise _BuildFailed(f"{compiler} could not build {source.name}: {lines[0][:300]}")
    except _BuildFailed as exc:
        return str(exc)
    except (OSError, subprocess.SubprocessError, GptqToolsError) as exc:
        return f"building {source.name} into {library.parent} failed ({exc})"
    return None


class _BuildFailed(Exception):
    """The compiler refused the source (raised inside ``atomic_path`` so that nothing is published)."""
