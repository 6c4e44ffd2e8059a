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
from ..errors import InsufficientSpaceError, OutputExistsError, OutputNotWritableError, UnsafePathError

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
def atomic_path(final: str | os.PathLike[str], *, force: bool = False, mode: int | None = None) -> Iterator[Path]:
    """A fresh temporary path beside ``final`` that is renamed to ``final`` when the ``with`` block ends
    without error, and removed otherwise. The caller writes (and fsyncs) the temporary file. The
    published file gets the mode a plain ``open()`` gives (``0o666`` less the umask: 0644 under 022), or
    exactly ``mode`` when given (whatever the umask).

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
            os.chmod(temp, mode if mode is not None else 0o666 & ~current_umask())  # the writer may have recreated it
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
    with atomic_path(final, force=force) as temp, \
            os.fdopen(open_nofollow(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), mode) as handle:
        try:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as exc:
            raise_if_no_space(exc, Path(final))
            raise


def open_nofollow(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o666, *,
                  root: str | os.PathLike[str] | None = None, make_parents: bool = False) -> int:
    """Open ``path`` without following a symlink at its last component, nor at any folder below ``root``.

    The one way the project opens a file inside a folder it does not own alone (a ``--local-dir``, an
    output folder, a download's state folder): a symlink planted at a computable name (a partial
    download, a temporary) would otherwise make a write land on the link's target outside the folder.
    With ``root``, every folder from ``root`` (which may itself be a link: the user chose it) down to
    ``path``'s folder is opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to the one above it, so a
    folder swapped for a link between the check and the open cannot redirect the file either.

    Args:
        path: the file; must lie under ``root`` when ``root`` is given.
        flags: ``os.O_*`` flags (``O_NOFOLLOW`` and ``O_CLOEXEC`` are added).
        mode: permission bits for a created file (the umask applies).
        root: the folder the user chose; folders below it are checked (None: only the last component).
        make_parents: create missing folders below ``root`` (mode 0777 less the umask).

    Returns:
        A file descriptor the caller closes.

    Raises:
        UnsafePathError: ``path`` or a folder below ``root`` is a symlink or not a folder.
        FileNotFoundError, PermissionError, ...: as ``os.open``.
    """
    path = Path(os.path.abspath(path))
    flags |= os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    folder_fd = _open_folder_chain(path, root, make_parents=make_parents)
    try:
        try:
            return os.open(path.name if folder_fd is not None else path, flags, mode, dir_fd=folder_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"{path}: is a symbolic link where gptq-tools keeps a file of its own; it was "
                                      f"not followed. Remove the link (its target is untouched) and run "
                                      f"again") from None
            raise
    finally:
        if folder_fd is not None:
            os.close(folder_fd)


def _open_folder_chain(path: Path, root: str | os.PathLike[str] | None, *, make_parents: bool) -> int | None:
    """A descriptor of ``path``'s folder reached from ``root`` one real folder at a time (None without root)."""
    if root is None:
        return None
    base = Path(os.path.abspath(root))
    try:
        steps = path.parent.relative_to(base).parts
    except ValueError:
        raise UnsafePathError(f"{path}: lies outside {base}; refusing to write there") from None
    folder_flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
    if make_parents:
        base.mkdir(parents=True, exist_ok=True)
    current = os.open(base, folder_flags)
    here = base
    try:
        for step in steps:
            here = here / step
            if make_parents:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(step, 0o777, dir_fd=current)
            try:
                following = os.open(step, folder_flags | os.O_NOFOLLOW, dir_fd=current)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    what = "a symbolic link" if os.path.islink(here) else "not a folder"
                    raise UnsafePathError(f"{here}: is {what} where gptq-tools needs a folder of its own; it was not "
                                          f"followed. Move it away and run again") from None
                raise
            os.close(current)
            current = following
    except BaseException:
        os.close(current)
        raise
    return current


def ensure_folder(folder: str | os.PathLike[str], *, root: str | os.PathLike[str]) -> Path:
    """Create ``folder`` (and its parents below ``root``), each checked to be a real folder, not a link.

    Raises:
        UnsafePathError: a folder below ``root`` is a symbolic link or a file.
    """
    os.close(_open_folder_chain(Path(os.path.abspath(folder)) / "_", root, make_parents=True))  # type: ignore[arg-type]
    return Path(folder)


def lstat_regular(path: str | os.PathLike[str]) -> os.stat_result | None:
    """``os.lstat`` of a regular file; None when absent. A link or anything else is not trusted as a file.

    Raises:
        UnsafePathError: something other than a regular file sits at ``path``.
    """
    import stat as stat_module

    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat_module.S_ISREG(info.st_mode):
        kind = "a symbolic link" if stat_module.S_ISLNK(info.st_mode) else "not a regular file"
        raise UnsafePathError(f"{path}: is {kind} where gptq-tools keeps a file of its own; it was not followed. "
                              f"Remove it (a link's target is untouched) and run again")
    return info


def write_all(sink: int | BinaryIO, data: bytes | bytearray | memoryview, *, offset: int | None = None,
              target: str | os.PathLike[str] | None = None) -> None:
    """Write every byte of ``data`` to ``sink`` (a descriptor, or an unbuffered file's ``write``), looping
    over short writes; with ``offset`` (descriptors only) through ``pwrite``.

    A write that returns 0 bytes, or fails (full disk, quota, file-size limit), raises: a short count is
    never taken for success, so a truncated file never passes as complete.

    Raises:
        InsufficientSpaceError: the disk, a quota or a file-size limit stopped the write (names ``target``).
        OSError: any other failure.
    """
    view = memoryview(data).cast("B")
    name = Path(target) if target is not None else Path(f"<fd {sink}>")
    try:
        while view:
            if isinstance(sink, int):
                written = os.write(sink, view) if offset is None else os.pwrite(sink, view, offset)
            else:
                written = sink.write(view)
            if not written:  # 0, or None from a non-blocking file: nothing moved, and nothing will
                raise OSError(errno.ENOSPC, "a write stored no byte", os.fspath(name))
            view = view[written:]
            if offset is not None:
                offset += written
    except OSError as exc:
        raise_if_no_space(exc, name)
        raise


#: While waiting for another run's lock: seconds between checks, and between the log lines saying so.
LOCK_POLL_SECONDS = 0.2
LOCK_WAIT_LOG_SECONDS = 30.0


@contextlib.contextmanager
def work_lock(lock_path: str | os.PathLike[str], *, what: str, wait_seconds: float = 0.0) -> Iterator[bool]:
    """Hold an advisory lock (``flock``) on ``lock_path`` for the ``with`` block: one run per working folder.

    The lock file holds the holder's PID, for the message a second run gets. A process that dies drops
    its lock with its descriptors, so a lock left by a killed run is simply taken over; the file is
    removed on release (checked to be the file still at that name after locking, so a run that opened
    a file just removed by the previous holder locks again instead of holding a lock nobody sees).

    Args:
        lock_path: the lock file (created, never followed if it is a link).
        what: the work, for the message (``"download into /x"``).
        wait_seconds: how long to wait for another run to release the lock (0: refuse at once; ``math.inf``:
            without limit); a warning says so when the wait starts and every :data:`LOCK_WAIT_LOG_SECONDS`.

    Yields:
        Whether another run held the lock first (what was planned before it may be stale).

    Raises:
        OutputExistsError: another live process still holds the lock after ``wait_seconds`` (the message
            names its PID).
    """
    import fcntl
    import math
    import time

    lock_path = Path(lock_path)
    deadline = time.monotonic() + wait_seconds
    waited, next_log = False, 0.0
    while True:
        fd = open_nofollow(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            now = time.monotonic()
            if now >= deadline:
                waited_for = f" (waited {wait_seconds:g} s)" if waited else ""
                raise OutputExistsError(f"{lock_path.parent}: another gptq-tools process (pid {holder}) is already "
                                        f"running the {what} here{waited_for}; wait for it to finish, or stop it, "
                                        f"then run again") from None
            if now >= next_log:
                left = "without limit" if math.isinf(wait_seconds) else f"up to {deadline - now:.0f} s more"
                logger.warning("%s: another gptq-tools process (pid %s) is running the %s here; waiting for it "
                               "(%s)", lock_path.parent, holder, what, left)
                next_log = now + LOCK_WAIT_LOG_SECONDS
            waited = True
            time.sleep(min(LOCK_POLL_SECONDS, max(deadline - now, 0.0)))
            continue
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed it between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        write_all(fd, f"{os.getpid()}\n".encode(), offset=0, target=lock_path)
        yield waited
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def write_bytes_atomic(final: str | os.PathLike[str], data: bytes, *, force: bool = True) -> None:
    """Write ``data`` to ``final`` atomically (used for small files: configs, manifests, indexes)."""
    with atomic_output(final, force=force) as handle:
        handle.write(data)


def raise_if_no_space(exc: OSError, target: Path) -> None:
    """Turn ENOSPC/EDQUOT/EFBIG into :class:`InsufficientSpaceError` naming ``target``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise InsufficientSpaceError(
            f"{target}: the disk filled up while writing; nothing was written at the final name. "
            f"Free some space or choose another output folder") from exc
    if exc.errno == errno.EFBIG:
        raise InsufficientSpaceError(
            f"{target}: the file grew past a file-size limit (ulimit -f, or the filesystem's largest file) while "
            f"writing; nothing was written at the final name. Raise the limit or choose another output "
            f"folder") from exc


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
