"""Build a C file of this package into a shared library once, keep it in the cache, load it with ctypes.

A kernel whose loops no library ships (:mod:`.cpu_int4_native`) is written in C, compiled
on first use by the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) and cached under
:func:`gptq_tools.constants.native_cache_dir`, named by a hash of the source, the compiler and its flags:
a changed source or compiler builds a new file, and a build is published by an atomic rename, so
concurrent processes never load a half-written library. Nothing here raises on a missing compiler or a
failed build: :func:`load` returns the reason instead, and the kernel reports itself unsupported with it.

A library is code that runs in this process when loaded, and its name is computable from public inputs,
so the cache is trusted only as far as nobody else can write it: a library is loaded only when it is a
regular file owned by this user and not writable by group or others, in a folder with the same
properties (checked on an open descriptor, and the loaded file checked to be the same one). An untrusted
library in a trusted folder is rebuilt over; an untrusted folder (shared scratch, a link, someone else's)
is not used at all: the library is built into a private temporary folder for this process instead.
Published libraries are mode 0644 and the folder 0755, whatever the umask.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from ... import constants
from ...errors import GptqToolsError, UnsafePathError
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
    folder = _trusted_cache_folder(constants.native_cache_dir())
    if folder is None:
        return _load_private(compiler, path, flags, f"{path.stem}-{key}.so")
    library = folder / f"{path.stem}-{key}.so"
    if os.path.lexists(library):
        loaded = _load_trusted(library)
        if not isinstance(loaded, str):
            return loaded
        logger.warning("%s: %s; not loading it, building it again", library, loaded)
    reason = _build(compiler, path, flags, library)
    if reason is not None:
        return reason
    loaded = _load_trusted(library)
    return loaded if not isinstance(loaded, str) else f"{library}: {loaded} right after it was built; not loaded"


def untrusted_reason(info: os.stat_result) -> str | None:
    """Why a file or folder with ``info`` (from ``lstat``/``fstat``) must not be trusted, or None."""
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if info.st_uid != os.geteuid():
        return f"it is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    writers = {0o022: "group and others", 0o020: "group", 0o002: "others"}.get(info.st_mode & 0o022)
    if writers is not None:
        return f"it is writable by {writers} (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _trusted_cache_folder(folder: Path) -> Path | None:
    """``folder``, created 0755 if missing; None (with a warning) when someone else could write into it."""
    created = not os.path.lexists(folder)
    try:
        if created:
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o755)
        reason = untrusted_reason(os.lstat(folder))
    except OSError as exc:
        reason = f"it cannot be used ({exc.strerror})"
    if reason is None:
        return folder
    _warn_untrusted_folder(str(folder), reason)
    return None


@functools.cache
def _warn_untrusted_folder(folder: str, reason: str) -> None:
    logger.warning("%s: not using this kernel cache, %s (another user could plant a library there); building "
                   "the native kernels privately for this process instead. Use a folder only you can write "
                   "(GPTQ_TOOLS_CACHE_DIR)", folder, reason)


def _load_trusted(library: Path) -> ctypes.CDLL | str:
    """Load ``library`` when it is a regular file of ours that only we can write; else say why not."""
    try:
        fd = os.open(library, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return "it is a symbolic link" if exc.errno == errno.ELOOP else f"it cannot be opened ({exc.strerror})"
    try:
        info = os.fstat(fd)
        reason = untrusted_reason(info) or (None if stat.S_ISREG(info.st_mode) else "it is not a regular file")
        if reason is not None:
            return reason
        # By path, not /proc/self/fd/N: the dynamic loader reuses a handle by name, and fd numbers repeat.
        # The folder was checked to be writable by us alone, so nobody else can swap the file in between;
        # the identity check after loading catches anything that did.
        try:
            loaded = ctypes.CDLL(str(library))
        except OSError as exc:
            return f"loading it failed ({exc}); delete it to rebuild"
        after = os.stat(library)
        if (after.st_dev, after.st_ino) != (info.st_dev, info.st_ino):
            raise UnsafePathError(f"{library}: was replaced while being loaded; another process writes the kernel "
                                  f"cache, stop it and run again")
        return loaded
    finally:
        os.close(fd)


def _load_private(compiler: str, source: Path, flags: tuple[str, ...], name: str) -> ctypes.CDLL | str:
    """Build into a fresh private folder (0700, ours), load, then remove the folder (the mapping stays)."""
    folder = Path(tempfile.mkdtemp(prefix="gptq-tools-native-"))
    try:
        library = folder / name
        reason = _build(compiler, source, flags, library)
        return reason if reason is not None else _load_trusted(library)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _build(compiler: str, source: Path, flags: tuple[str, ...], library: Path) -> str | None:
    logger.info("building %s with %s into %s", source.name, compiler, library)
    try:
        with atomic_path(library, force=True, mode=0o644) as temp:
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
