"""Files on disk: atomic outputs, free-space checks, fast hashing.

A file at its final name is always complete and verified: outputs are written to a uniquely named
temporary file in the destination folder, fsynced, then renamed with ``os.replace``; the temporary is
removed in ``finally`` if anything goes wrong.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..constants import kill_at_step, step_log_path
from ..errors import InsufficientSpaceError, OutputExistsError, OutputNotWritableError

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".gptq-tools-tmp-"


class _StepCounter:
    """Counts this process's publishing steps (threads publish too: downloads finish in parallel)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def next(self) -> int:
        with self._lock:
            self._count += 1
            return self._count


_STEPS = _StepCounter()


def publish_step(kind: str, path: str | os.PathLike[str]) -> None:
    """Mark that one publishing step (``kind`` on ``path``) has just completed.

    Every rename, unlink and tree removal that changes what sits at a final name goes through
    :func:`replace`, :func:`unlink` or :func:`rmtree`, which call this right after the step. It does
    nothing unless a test asks for it: ``GPTQ_TOOLS_STEP_LOG`` records the steps, and
    ``GPTQ_TOOLS_KILL_AT_STEP=N`` kills the process with SIGKILL right after the N-th one, so a test can
    prove that a rerun repairs a run killed at each step.
    """
    log_path, kill_at = step_log_path(), kill_at_step()
    if log_path is None and kill_at is None:
        return
    number = _STEPS.next()
    if log_path is not None:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"{kind} {os.fspath(path)}\n")
    if kill_at == number:
        os.kill(os.getpid(), signal.SIGKILL)


def replace(source: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """``os.replace`` as a publishing step (see :func:`publish_step`)."""
    os.replace(source, final)
    publish_step("replace", final)


def unlink(path: str | os.PathLike[str], *, missing_ok: bool = False) -> None:
    """Remove a file as a publishing step (see :func:`publish_step`)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return
    publish_step("unlink", path)


def rmtree(path: str | os.PathLike[str]) -> None:
    """Remove a folder tree as a publishing step (see :func:`publish_step`); a missing tree is fine."""
    if not os.path.lexists(path):
        return
    shutil.rmtree(path)
    publish_step("rmtree", path)


def temp_path_for(final: Path) -> Path:
    """A fresh, unique temporary path next to ``final`` (same filesystem, so the rename is atomic).

    The name carries our PID so that a later run can recognise and remove the leftovers of a run that
    was killed (see :func:`remove_stale_temps`). The file gets the mode a plain ``open()`` would give
    it (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``: it is published as it is.

    Raises:
        OutputNotWritableError: the folder is read-only or not writable (the message names ``final``).
    """
    try:
        handle, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{final.name}.{os.getpid()}.", dir=final.parent)
    except OSError as exc:
        raise_if_not_writable(exc, final)
        raise
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
    finally:
        os.close(handle)
    return Path(name)


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def raise_if_not_writable(exc: OSError, target: Path) -> None:
    """Turn EACCES/EPERM/EROFS on ``target``'s folder into :class:`OutputNotWritableError` naming ``target``."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "the filesystem is read-only" if exc.errno == errno.EROFS else "permission denied"
        raise OutputNotWritableError(
            f"{target}: cannot write the output here ({reason}); choose another output folder or make "
            f"{target.parent} writable") from exc


def remove_stale_temp_dirs(folder: Path, tag: str) -> list[Path]:
    """Delete work folders ``TEMP_PREFIX + tag + ".<pid>.*"`` in ``folder`` left by processes that no longer run."""
    removed: list[Path] = []
    prefix = f"{TEMP_PREFIX}{tag}."
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        pid_text = entry.name[len(prefix):].split(".", 1)[0] if entry.name.startswith(prefix) else ""
        if pid_text.isdigit() and not _process_alive(int(pid_text)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            logger.info("removed %s, left by an interrupted run (pid %s)", entry, pid_text)
    return removed


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete temporaries for ``final`` left by processes that no longer run (killed mid-write)."""
    removed: list[Path] = []
    prefix = f"{TEMP_PREFIX}{final.name}."
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix):].split(".", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
                logger.info("removed %s, left by an interrupted run (pid %s)", entry, pid_text)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_free(path: Path, *, force: bool, why: str = "") -> None:
    """Refuse to overwrite ``path`` unless ``force``; ``why`` (", and ...") says why it cannot be reused."""
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: output already exists{why}; pass --force to overwrite it")


def check_free_space(folder: Path, needed: int, *, what: str) -> None:
    """Raise :class:`InsufficientSpaceError` when ``folder``'s filesystem has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        from ..units import format_size

        raise InsufficientSpaceError(
            f"{folder}: {what} needs {format_size(needed)} but only {format_size(free)} is free; "
            f"free some space or choose another output folder")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """A fresh temporary path beside ``final`` that is renamed to ``final`` when the ``with`` block ends
    without error, and removed otherwise. The caller writes (and fsyncs) the temporary file. The
    published file gets the mode a plain ``open()`` gives (``0o666`` less the umask: 0644 under 022).

    Raises:
        OutputExistsError: ``final`` exists (before or after the block) and ``force`` is False.
        OutputNotWritableError: the destination folder is read-only or not writable.
    """
    final = Path(final)
    check_output_free(final, force=force)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise_if_not_writable(exc, final)
        raise
    remove_stale_temps(final)
    temp = temp_path_for(final)
    try:
        yield temp
        if final.exists() and not force:  # appeared while we were writing
            raise OutputExistsError(f"{final}: output appeared while writing; pass --force to overwrite it")
        try:
            os.chmod(temp, 0o666 & ~current_umask())  # the writer may have recreated it (safetensors does)
            replace(temp, final)
        except OSError as exc:
            raise_if_not_writable(exc, final)
            raise
        fsync_dir(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


@contextlib.contextmanager
def atomic_output(final: str | os.PathLike[str], *, force: bool = False, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file that becomes ``final`` only when the ``with`` block ends without error.

    Raises:
        OutputExistsError: ``final`` exists and ``force`` is False.
        InsufficientSpaceError: the disk filled up while writing.
    """
    with atomic_path(final, force=force) as temp, open(temp, mode) as handle:
        try:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as exc:
            raise_if_no_space(exc, Path(final))
            raise


def write_bytes_atomic(final: str | os.PathLike[str], data: bytes, *, force: bool = True) -> None:
    """Write ``data`` to ``final`` atomically (used for small files: configs, manifests, indexes)."""
    with atomic_output(final, force=force) as handle:
        handle.write(data)


def raise_if_no_space(exc: OSError, target: Path) -> None:
    """Turn ENOSPC/EDQUOT into :class:`InsufficientSpaceError` naming ``target``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise InsufficientSpaceError(
            f"{target}: the disk filled up while writing; nothing was written at the final name. "
            f"Free some space or choose another output folder") from exc


def fsync_dir(folder: Path) -> None:
    """fsync a directory so a rename in it survives a crash (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def advise_sequential(fd: int, offset: int = 0, length: int = 0) -> None:
    """Tell the kernel we read ``fd`` front to back, so it reads ahead in larger windows."""
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_SEQUENTIAL)


def prefetch_range(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start reading ``[offset, offset + length)`` now (keeps the disk queue busy)."""
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
