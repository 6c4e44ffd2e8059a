"""The byte transfer: parallel files and byte ranges, hashed while streaming, resumable, verified.

Why not huggingface_hub's ``hf_hub_download``: it checks only the size of what arrives (never the
SHA256), restarts a killed download from zero (since v1.18) and fetches one file over one connection.
So the bytes are streamed here with ``httpx2``, the HTTP client huggingface_hub itself depends on, while
huggingface_hub still does the metadata, auth headers and endpoint.

How a file travels: it is cut into chunks of ``chunk_bytes`` that the workers fetch with ``Range``
requests, at most ``window`` bytes ahead of the first byte not yet written. Arriving bytes are written
to ``incomplete/<hash>-<path id>.incomplete`` strictly in file order and fed to the hasher as they are
written (no second read); out-of-order chunks wait in memory. The file on disk is therefore always a
clean prefix, which is what a re-run resumes from after re-hashing it. Only when all bytes are there and
the digest matches the Hub's does the file take its final name (:func:`gptq_tools.files.fileio.replace`). A
wrong digest is fetched once more from scratch, then reported with both hashes. A server that sends
more or fewer bytes than the listing says, or redirects in a loop, is an error at once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import IO_CHUNK_BYTES
from ..errors import (
    ChecksumMismatchError,
    GptqToolsError,
    HubAuthError,
    HubError,
    IncompleteDownloadError,
    UnsafePathError,
)
from ..files.fileio import ensure_folder, fsync_dir, open_nofollow, replace, unlink, write_all
from .http import MAX_REDIRECTS, make_client
from .remote import without_credentials
from .state import start_hasher

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
#: Blocks at least this large are hashed on a second thread while they are written.
_PARALLEL_HASH_BYTES = 1 * MiB
#: Reads at least this large are committed as they are instead of being gathered into a block.
_DIRECT_BYTES = 256 * 1024


@dataclass(frozen=True)
class TransferOptions:
    """How bytes are fetched.

    Attributes:
        max_workers: parallel connections (shared by all files).
        chunk_bytes: size of one ``Range`` request.
        window_chunks: how many chunks of one file may be in flight or waiting ahead of the written
            prefix (bounds memory to about ``window_chunks * chunk_bytes`` per file); 0 means ``2 * max_workers``.
        retries: attempts per chunk without progress before giving up (resets whenever bytes arrive).
        backoff_base: first wait after a transient failure, doubled each time up to ``backoff_max``.
        retry_after_max: longest ``Retry-After`` honoured.
        stall_timeout: seconds without a byte before a response counts as stalled and is retried.
        connect_timeout: seconds to open a connection.
        mismatch_retries: full re-downloads after a wrong hash before reporting it.
        commit_bytes: received bytes are gathered into blocks of this size before being written and hashed.
    """

    max_workers: int = 8
    chunk_bytes: int = 32 * MiB
    window_chunks: int = 0
    retries: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    retry_after_max: float = 120.0
    stall_timeout: float = 60.0
    connect_timeout: float = 15.0
    mismatch_retries: int = 1
    commit_bytes: int = 4 * MiB

    @property
    def window_bytes(self) -> int:
        """How far ahead of the written prefix ranges of one file may be fetched."""
        return (self.window_chunks or max(2 * self.max_workers, 2)) * self.chunk_bytes


@dataclass(frozen=True)
class FileTask:
    """One file to fetch: where from, how big, which hash, where its bytes go."""

    path: str
    url: str
    size: int
    checksum: tuple[str, str]
    incomplete: Path
    final: Path
    #: The folder the user chose: no folder below it is followed if it is a link (None: not checked).
    root: Path | None = None


class _Retry(Exception):
    """A transient failure: wait and ask again."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Abandon(Exception):
    """The chunk belongs to an older attempt of its file (restarted or failed): drop it."""


class _FileJob:
    """A file in transfer: the written prefix, chunks waiting for it, and the running hash."""

    def __init__(self, task: FileTask, bar: Any, options: TransferOptions,
                 on_verified: Callable[[FileTask], None] | None, hash_pool: ThreadPoolExecutor) -> None:
        self.task = task
        self.hash_pool = hash_pool
        self.bar = bar
        self.options = options
        self.on_verified = on_verified
        self.lock = threading.Lock()
        self.generation = 0
        self.mismatches = 0
        self.pending: dict[int, bytes] = {}
        self.writing = False
        self.done = False
        self.error: BaseException | None = None
        self.inflight = 0
        self.range_ok: bool | None = None
        self.handle: Any = None
        self.hasher = start_hasher(task.checksum[0], task.size)
        self.hashed = 0
        self.next_offset = 0
        self.wake: Callable[[], None] = lambda: None  # set by the scheduler: the window may have opened

    @property
    def finished(self) -> bool:
        """Verified and renamed, or failed."""
        return self.done or self.error is not None

    def open(self) -> None:
        """Open the ``.incomplete`` file and re-hash the bytes already in it (they are not trusted).

        The partial file's name can be computed from the public listing, so a link (or anything that
        is not a regular file) found there was planted or copied in: it is removed, never followed, and
        the file starts from zero; its target is not touched. The open itself refuses a link too.
        """
        task = self.task
        _remove_if_not_regular(task.incomplete)
        fd = open_nofollow(task.incomplete, os.O_RDWR | os.O_CREAT, root=task.root,
                           make_parents=task.root is not None)
        try:
            have = min(os.fstat(fd).st_size, task.size)
            if have:
                logger.info("%s: resuming after %d bytes already on disk (re-hashing them first)", task.path, have)
                _feed_fd(self.hasher, fd, have, self.bar.update)
            self.handle = open(fd, "r+b", buffering=0)  # noqa: SIM115 - closed by _finish/fail/fetch_files
        except BaseException:
            os.close(fd)
            raise
        self.handle.truncate(have)
        self.handle.seek(have)
        self.hashed = self.next_offset = have
        if have == task.size:
            self._finish()

    def commit(self, offset: int, data: bytes, generation: int) -> None:
        """Hand over bytes that start at ``offset``; they are written and hashed once all before them are."""
        with self.lock:
            if generation != self.generation or self.finished:
                raise _Abandon()
            self.pending[offset] = data
            if self.writing:
                return
            self.writing = True
        complete = False
        try:
            while True:
                with self.lock:
                    chunk = self.pending.pop(self.hashed, None)
                    if chunk is None or generation != self.generation:
                        # cleared under the same lock as the look-up, so no chunk can be left behind
                        self.writing = False
                        complete = self.hashed == self.task.size and generation == self.generation
                        break
                self._write_and_hash(chunk)
                with self.lock:
                    self.hashed += len(chunk)
                self.bar.update(len(chunk))
        except BaseException:
            with self.lock:
                self.writing = False
            raise
        self.wake()
        if complete:
            self._finish()

    def _write_and_hash(self, chunk: bytes) -> None:
        """Write ``chunk`` at the end of the prefix while another thread hashes it (both release the GIL)."""
        hashing = self.hash_pool.submit(self.hasher.update, chunk) if len(chunk) >= _PARALLEL_HASH_BYTES else None
        try:
            write_all(self.handle, chunk, target=self.task.final)  # a short write is never taken as done
        finally:
            if hashing is not None:
                hashing.result()
        if hashing is None:
            self.hasher.update(chunk)

    def _finish(self) -> None:
        """All bytes are written: rename on a matching hash, otherwise start again or report."""
        algorithm, expected = self.task.checksum
        actual = self.hasher.hexdigest()
        if actual == expected:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            if self.task.root is not None:
                ensure_folder(self.task.final.parent, root=self.task.root)
            else:
                self.task.final.parent.mkdir(parents=True, exist_ok=True)
            replace(self.task.incomplete, self.task.final)
            fsync_dir(self.task.final.parent)
            logger.info("%s: %s verified (%s)", self.task.path, algorithm, expected)
            if self.on_verified is not None:
                self.on_verified(self.task)
            self.done = True
            return
        if self.mismatches < self.options.mismatch_retries:
            self.mismatches += 1
            logger.warning("%s: %s of the downloaded bytes is %s, expected %s; downloading it again from scratch",
                           self.task.path, algorithm, actual, expected)
            self.restart()
            return
        self.handle.close()
        unlink(self.task.incomplete, missing_ok=True)
        self.fail(ChecksumMismatchError(
            f"{self.task.path}: downloaded twice and both times the bytes have {algorithm} {actual}, but the Hub "
            f"lists {expected}; the file on the server may be damaged, report it to the repository owner"))

    def restart(self) -> None:
        """Throw away everything written and fetch the file again from byte 0."""
        with self.lock:
            self.generation += 1
            self.pending.clear()
            self.bar.update(-self.hashed)
            self.handle.seek(0)
            self.handle.truncate(0)
            self.hasher = start_hasher(self.task.checksum[0], self.task.size)
            self.hashed = self.next_offset = 0
            self.range_ok = None

    def fail(self, error: BaseException) -> None:
        """End this file with ``error`` (the first one is kept); its bytes on disk stay for a later resume."""
        with self.lock:
            if self.error is None:
                self.error = error
            self.generation += 1
            self.pending.clear()
        if self.handle is not None and not self.handle.closed:
            self.handle.close()
        self.wake()

    def can_take(self) -> bool:
        """Whether a range can be handed out now (not all handed out, no range probe pending, window open)."""
        if self.finished or self.next_offset >= self.task.size:
            return False
        if self.range_ok is None and self.inflight > 0:
            return False  # the first response tells whether the server honours Range
        return self.next_offset < self.hashed + self.options.window_bytes

    def take_chunk(self) -> tuple[int, int, int]:
        """Hand out the next range (call only when :meth:`can_take`)."""
        start = self.next_offset
        end = self.task.size if self.range_ok is False else min(start + self.options.chunk_bytes, self.task.size)
        self.next_offset = end
        self.inflight += 1
        return start, end, self.generation


def _remove_if_not_regular(path: Path) -> None:
    """Remove a link or other non-file at ``path`` (a partial file's name) without following it."""
    import stat

    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    if not stat.S_ISREG(info.st_mode):
        logger.warning("%s: not a regular file (%s) where a partial download belongs; removed it without "
                       "following it and starting that file from zero", path,
                       "a symbolic link" if stat.S_ISLNK(info.st_mode) else "something else")
        if stat.S_ISDIR(info.st_mode):
            raise UnsafePathError(f"{path}: is a folder where a partial download belongs; move it away and run again")
        unlink(path)


def _feed_fd(hasher: Any, fd: int, length: int, on_bytes: Callable[[int], object]) -> None:
    """Hash the first ``length`` bytes of the open file ``fd`` (the very file that will be appended to)."""
    position = 0
    while position < length:
        data = os.pread(fd, min(IO_CHUNK_BYTES, length - position), position)
        if not data:
            raise IncompleteDownloadError(f"<fd {fd}>: shrank while being re-hashed; run the same command again")
        hasher.update(data)
        position += len(data)
        on_bytes(len(data))


class _Scheduler:
    """Hands chunks to workers: to the file with the fewest chunks in flight, the larger remainder first."""

    def __init__(self, jobs: Sequence[_FileJob]) -> None:
        self.jobs = list(jobs)
        self.cond = threading.Condition()
        self.cancelled = threading.Event()
        for job in self.jobs:
            job.wake = self.wake

    def wake(self) -> None:
        """Wake waiting workers (a window opened, a file ended)."""
        with self.cond:
            self.cond.notify_all()

    def next_work(self) -> tuple[_FileJob, int, int, int] | None:
        """Block until a range can be handed out: ``(job, start, end, generation)``, or None when all is done."""
        with self.cond:
            while not self.cancelled.is_set():
                active = [job for job in self.jobs if not job.finished]
                if not active:
                    return None
                ready = [job for job in active if job.can_take()]
                if ready:
                    # spread workers over files: each file's in-order write+hash runs on its own thread,
                    # so several files progressing together use several cores
                    job = min(ready, key=lambda j: (j.inflight, j.next_offset - j.task.size))
                    return (job, *job.take_chunk())
                if not any(job.inflight or job.writing for job in active):
                    self._fail_stuck(active)
                    continue
                self.cond.wait(0.5)
        return None

    @staticmethod
    def _fail_stuck(jobs: Sequence[_FileJob]) -> None:
        """Nothing in flight and nothing to hand out: end these files instead of waiting forever."""
        for job in jobs:
            job.fail(IncompleteDownloadError(
                f"{job.task.path}: stopped at byte {job.hashed} of {job.task.size} with nothing left to fetch "
                f"(the server's answers did not add up); run the same command again to resume"))

    def chunk_done(self, job: _FileJob) -> None:
        """A worker is done with a range of ``job`` (fetched, abandoned or failed)."""
        with self.cond:
            job.inflight -= 1
            self.cond.notify_all()

    def range_answer(self, job: _FileJob, honoured: bool) -> bool:
        """Record whether the server honoured ``Range`` for ``job``; True if this worker must stream to the end."""
        with self.cond:
            first = job.range_ok is None
            if first:
                job.range_ok = honoured
                if not honoured:
                    logger.warning("%s: the server ignores Range requests; fetching it as one stream", job.task.path)
                    job.next_offset = job.task.size
            self.cond.notify_all()
            return first and not honoured


def _status_error(job: _FileJob, response: Any) -> BaseException:
    status = response.status_code
    if status == 429 or status >= 500:
        retry_after = response.headers.get("Retry-After")
        seconds = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
        return _Retry(f"HTTP {status}", seconds)
    if status in (401, 403):
        return HubAuthError(f"{job.task.path}: download refused (HTTP {status}); log in with `hf auth login` or "
                            f"set HF_TOKEN to a token that can read this repository")
    return HubError(f"{job.task.path}: the server answered HTTP {status} for {without_credentials(job.task.url)}; "
                    f"check the repository "
                    f"and revision")


def _fetch_chunk(job: _FileJob, start: int, end: int, generation: int, client: Any,
                 sched: _Scheduler) -> None:
    """Fetch ``[start, end)`` of ``job``'s file, retrying transient failures with backoff."""
    import httpx2

    options = job.options
    position, failures = start, 0
    while position < end:
        if sched.cancelled.is_set():
            return
        try:
            position, end = _stream_once(job, position, end, generation, client, sched)
        except _PartialProgress as progress:
            failures = 0 if progress.position > position else failures + 1
            position, end = progress.position, progress.end
            delay = _delay(options, failures, progress.cause)
            if failures > options.retries:
                raise IncompleteDownloadError(
                    f"{job.task.path}: gave up at byte {position} of {job.task.size} after {failures} failed attempts "
                    f"({progress.cause}); run the same command again to resume") from None
            logger.warning("%s: %s at byte %d; retrying in %.1fs", job.task.path, progress.cause, position, delay)
            sched.cancelled.wait(delay)
        except httpx2.InvalidURL as exc:
            raise HubError(f"{without_credentials(job.task.url)}: invalid URL ({exc})") from None
        except httpx2.TooManyRedirects as exc:
            raise HubError(f"{job.task.path}: {without_credentials(str(exc.request.url))} redirects in a loop (more "
                           f"than {MAX_REDIRECTS} redirects from {without_credentials(job.task.url)}); the server or a "
                           f"proxy is misconfigured, report it or try again later") from None


class _PartialProgress(Exception):
    """A request failed after reaching ``position`` of a range that ends at ``end``."""

    def __init__(self, position: int, end: int, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.position = position
        self.end = end
        self.cause = cause


def _delay(options: TransferOptions, failures: int, cause: BaseException) -> float:
    if isinstance(cause, _Retry) and cause.retry_after is not None:
        return min(cause.retry_after, options.retry_after_max)
    return min(options.backoff_base * (2 ** max(failures - 1, 0)), options.backoff_max)


def _stream_once(job: _FileJob, position: int, end: int, generation: int, client: Any,
                 sched: _Scheduler) -> tuple[int, int]:
    """One request for ``[position, end)``.

    Returns:
        The position reached and the end of the range (the file's end once the server ignored ``Range``).

    Raises:
        _PartialProgress: a transient failure, with the position reached.
    """
    import httpx2

    try:
        with client.stream("GET", job.task.url, headers={"Range": f"bytes={position}-{end - 1}"}) as response:
            if response.status_code not in (200, 206):
                raise _status_error(job, response)
            skip = 0
            if response.status_code == 206:
                _check_content_range(job, response, position)
                sched.range_answer(job, True)
            else:
                _check_content_length(job, response)
                if sched.range_answer(job, False):
                    end = job.task.size
                skip = position  # a 200 carries the whole file: drop what is already here
            sink = _Sink(job, position, end, generation)
            try:
                for piece in response.iter_raw():
                    if skip:
                        if len(piece) <= skip:
                            skip -= len(piece)
                            continue
                        piece, skip = piece[skip:], 0
                    if sched.cancelled.is_set() or sink.add(piece):
                        break
            finally:
                position = sink.flush()
            if position >= end or sched.cancelled.is_set():
                return position, end
        raise _Retry(f"the response ended {end - position} bytes early")
    except (_Retry, httpx2.TransportError) as exc:
        raise _PartialProgress(position, end, exc) from None


class _Sink:
    """Gathers a response's small reads into blocks of ``commit_bytes`` before handing them to the file.

    Fewer, larger writes and hash updates mean fewer lock round trips and GIL hand-overs per byte.
    """

    def __init__(self, job: _FileJob, position: int, end: int, generation: int) -> None:
        self.job = job
        self.start = position
        self.end = end
        self.generation = generation
        self.block = bytearray()
        self.limit = job.options.commit_bytes

    def add(self, piece: bytes) -> bool:
        """Take ``piece``; True once ``end`` is reached.

        Raises:
            HubError: bytes arrive past the end of the file (the server's file is longer than listed).
        """
        room = self.end - self.start - len(self.block)
        if len(piece) > room:
            if self.end >= self.job.task.size:
                raise _size_lie(self.job, "sends more")
            piece = piece[:room]
        if not self.block and len(piece) >= _DIRECT_BYTES:  # large reads go straight through, uncopied
            self.job.commit(self.start, piece, self.generation)
            self.start += len(piece)
            return self.start >= self.end
        self.block += piece
        if len(self.block) >= self.limit or len(piece) == room:
            self.flush()
        return self.start >= self.end

    def flush(self) -> int:
        """Commit what is gathered; returns the position reached."""
        if self.block:
            block, self.block = self.block, bytearray()
            self.job.commit(self.start, block, self.generation)  # type: ignore[arg-type]
            self.start += len(block)
        return self.start


def _check_content_range(job: _FileJob, response: Any, position: int) -> None:
    content_range = response.headers.get("Content-Range", "")
    try:
        first_last, _, total = content_range.split()[1].partition("/")
        first = int(first_last.split("-")[0])
    except (IndexError, ValueError):
        raise _Retry(f"unreadable Content-Range {content_range!r}") from None
    if total.isdigit() and int(total) != job.task.size:
        raise _size_lie(job, f"says the file has {int(total)} bytes")
    if first != position:
        raise _Retry(f"asked for byte {position} but the server sent from byte {first}")


def _check_content_length(job: _FileJob, response: Any) -> None:
    """A whole-file answer (200) must be as long as the listing says."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) != job.task.size:
        raise _size_lie(job, f"sends {int(length)} bytes")


def _size_lie(job: _FileJob, what: str) -> HubError:
    return HubError(f"{job.task.path}: the Hub listing says {job.task.size} bytes but the server {what} "
                    f"({without_credentials(job.task.url)}); the listing and the file disagree, so it was not saved. "
                    f"Report it to the repository owner")


def _worker(sched: _Scheduler, client: Any) -> None:
    while (work := sched.next_work()) is not None:
        job, start, end, generation = work
        try:
            _fetch_chunk(job, start, end, generation, client, sched)
        except _Abandon:
            continue  # the job was restarted or failed elsewhere: this range is no longer wanted
        except GptqToolsError as exc:
            job.fail(exc)
        except BaseException as exc:  # noqa: BLE001 - kept on the job and re-raised in the calling thread
            job.fail(exc)
        finally:
            sched.chunk_done(job)


def fetch_files(tasks: Sequence[FileTask], *, headers: dict[str, str], options: TransferOptions, bar: Any,
                on_verified: Callable[[FileTask], None] | None = None) -> None:
    """Fetch ``tasks`` into their final paths, each verified against its hash before it is renamed.

    Args:
        tasks: files to fetch (a partial ``incomplete`` file is resumed after re-hashing it).
        headers: HTTP headers for every request (auth, user agent).
        options: parallelism, chunking, retries and timeouts.
        bar: a tqdm-like object; ``update(n)`` is called with every byte written (negative on restart).
        on_verified: called (from a worker thread) as soon as a file is at its final name.

    Raises:
        ChecksumMismatchError: a file's bytes were wrong twice.
        IncompleteDownloadError: a file kept failing; what arrived stays on disk for the next run.
        HubAuthError, HubError: the server refused a file.
    """
    hash_pool = ThreadPoolExecutor(max_workers=max(1, options.max_workers), thread_name_prefix="hash")
    jobs = [_FileJob(task, bar, options, on_verified, hash_pool) for task in tasks]
    for job in jobs:
        job.open()
    sched = _Scheduler(jobs)
    client = make_client(headers, connections=options.max_workers * 2, read_timeout=options.stall_timeout,
                         connect_timeout=options.connect_timeout)
    threads = [threading.Thread(target=_worker, args=(sched, client), name=f"download-{i}", daemon=True)
               for i in range(max(1, options.max_workers))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    except BaseException:
        sched.cancelled.set()
        raise
    finally:
        sched.cancelled.set()
        for thread in threads:
            thread.join(5)
        client.close()
        hash_pool.shutdown(wait=True)
        for job in jobs:
            if job.handle is not None and not job.handle.closed:
                job.handle.close()
    _raise_failures(jobs)


def _raise_failures(jobs: Sequence[_FileJob]) -> None:
    failed = [job for job in jobs if job.error is not None]
    for job in failed[1:]:
        logger.error("%s", job.error)
    if failed:
        raise failed[0].error  # type: ignore[misc]
    unfinished = [job.task.path for job in jobs if not job.done]
    if unfinished:
        raise IncompleteDownloadError(f"{', '.join(unfinished)}: not finished; run the same command again to resume")
