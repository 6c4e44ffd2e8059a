"""One read, many consumers: the streaming engine behind join, split, verify and reshard.

A reader thread reads byte *segments* (a file, or a range of one) in order into a small pool of reused
buffers. Each consumer (whole-file hasher, per-segment hasher, writer, progress) runs in its own
thread and sees every chunk in order; a buffer goes back to the pool once every consumer is done with
it. hashlib and file I/O release the GIL on large buffers, so on two cores reading, hashing and writing
overlap instead of adding up, and every byte is read exactly once.
"""

from __future__ import annotations

import abc
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..constants import IO_CHUNK_BYTES
from ..errors import PartSetError
from .fileio import advise_sequential, prefetch_range, write_all


@dataclass(frozen=True)
class Segment:
    """``length`` bytes of ``path`` starting at ``offset``."""

    path: Path
    offset: int
    length: int


class Consumer(abc.ABC):
    """Receives every chunk in order, on its own thread."""

    @abc.abstractmethod
    def consume(self, segment_index: int, position: int, data: memoryview) -> None:
        """``data`` is the chunk at byte ``position`` of segment ``segment_index``."""

    def finish(self) -> None:  # noqa: B027 - an optional hook; most consumers need no clean-up
        """Called once after the last chunk, on the consumer's thread."""


class WholeHasher(Consumer):
    """One digest over all segments together (the joined file): SHA256 unless another hashlib
    object is given."""

    def __init__(self, digest: hashlib._Hash | None = None) -> None:
        self.digest = digest if digest is not None else hashlib.sha256()

    def consume(self, segment_index: int, position: int, data: memoryview) -> None:
        self.digest.update(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


class SegmentHasher(Consumer):
    """SHA256 of each segment on its own (each part)."""

    def __init__(self, count: int) -> None:
        self.digests = [hashlib.sha256() for _ in range(count)]

    def consume(self, segment_index: int, position: int, data: memoryview) -> None:
        self.digests[segment_index].update(data)

    def hexdigests(self) -> list[str]:
        return [digest.hexdigest() for digest in self.digests]


class CallbackConsumer(Consumer):
    """Calls ``callback(nbytes)`` per chunk (progress bars)."""

    def __init__(self, callback: Callable[[int], object]) -> None:
        self.callback = callback

    def consume(self, segment_index: int, position: int, data: memoryview) -> None:
        self.callback(len(data))


class PwriteConsumer(Consumer):
    """Writes chunk ``position`` of segment ``i`` to ``fds[i]`` at ``starts[i] + position``."""

    def __init__(self, fds: Sequence[int], starts: Sequence[int], targets: Sequence[Path]) -> None:
        self.fds, self.starts, self.targets = list(fds), list(starts), list(targets)

    def consume(self, segment_index: int, position: int, data: memoryview) -> None:
        write_all(self.fds[segment_index], data, offset=self.starts[segment_index] + position,
                  target=self.targets[segment_index])


_DONE = object()


def run_pipeline(segments: Sequence[Segment], consumers: Sequence[Consumer], *,
                 chunk_bytes: int = IO_CHUNK_BYTES, buffers: int = 4,
                 before_read: Callable[[int, int, int], None] | None = None) -> None:
    """Read ``segments`` once, in order, feeding every chunk to every consumer.

    ``before_read(segment_index, position, length)``, when given, runs on the reader thread right before
    each chunk is read (join uses it to copy a chunk into the output and then hash what landed there).

    Raises:
        PartSetError: a segment's file ended before ``length`` bytes (it shrank while being read).
        OSError: reading failed; or whatever a consumer raised (the first error wins; all threads stop).
    """
    pool: queue.Queue[int] = queue.Queue()
    storage = [bytearray(chunk_bytes) for _ in range(buffers)]
    for index in range(buffers):
        pool.put(index)
    pending = [0] * buffers
    lock = threading.Lock()
    queues: list[queue.Queue[object]] = [queue.Queue() for _ in consumers]
    errors: list[BaseException] = []
    failed = threading.Event()

    def release(buffer_index: int) -> None:
        with lock:
            pending[buffer_index] -= 1
            if pending[buffer_index] == 0:
                pool.put(buffer_index)

    def consumer_loop(consumer: Consumer, inbox: queue.Queue[object]) -> None:
        while True:
            item = inbox.get()
            if item is _DONE:
                break
            buffer_index, segment_index, position, length = item  # type: ignore[misc]
            try:
                if not failed.is_set():
                    consumer.consume(segment_index, position, memoryview(storage[buffer_index])[:length])
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(exc)
                failed.set()
            finally:
                release(buffer_index)
        if not failed.is_set():
            try:
                consumer.finish()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(exc)
                failed.set()

    threads = [threading.Thread(target=consumer_loop, args=(c, q), daemon=True, name=f"consumer-{i}")
               for i, (c, q) in enumerate(zip(consumers, queues))]
    for thread in threads:
        thread.start()
    try:
        _read_segments(segments, storage, pool, pending, lock, queues, failed, chunk_bytes, before_read)
    except BaseException as exc:  # noqa: BLE001 - re-raised below after the consumers stop
        errors.insert(0, exc)
        failed.set()
    finally:
        for inbox in queues:
            inbox.put(_DONE)
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]


def _read_segments(segments: Sequence[Segment], storage: list[bytearray], pool: queue.Queue[int],
                   pending: list[int], lock: threading.Lock, queues: list[queue.Queue[object]],
                   failed: threading.Event, chunk_bytes: int,
                   before_read: Callable[[int, int, int], None] | None = None) -> None:
    for segment_index, segment in enumerate(segments):
        with open(segment.path, "rb", buffering=0) as handle:
            if segment.offset:
                handle.seek(segment.offset)
            advise_sequential(handle.fileno(), segment.offset, segment.length)
            position = 0
            while position < segment.length:
                if failed.is_set():
                    return
                buffer_index = pool.get()
                prefetch_range(handle.fileno(), segment.offset + position + chunk_bytes, 2 * chunk_bytes)
                want = min(chunk_bytes, segment.length - position)
                if before_read is not None:
                    try:
                        before_read(segment_index, position, want)
                    except BaseException:
                        pool.put(buffer_index)
                        raise
                got = _read_full(handle, memoryview(storage[buffer_index])[:want])
                if got < want:
                    pool.put(buffer_index)
                    raise PartSetError(
                        f"{segment.path}: ended at byte {segment.offset + position + got} while "
                        f"{segment.offset + segment.length} were expected; it changed while being read")
                with lock:
                    pending[buffer_index] = len(queues)
                for inbox in queues:
                    inbox.put((buffer_index, segment_index, position, got))
                position += got


def _read_full(handle: object, view: memoryview) -> int:
    total = 0
    while total < len(view):
        got = handle.readinto(view[total:])  # type: ignore[attr-defined]
        if not got:
            break
        total += got
    return total


def file_segments(paths: Sequence[Path]) -> list[Segment]:
    """Whole-file segments for ``paths``."""
    return [Segment(Path(p), 0, os.path.getsize(p)) for p in paths]


def sha256_file(path: str | os.PathLike[str], *, on_bytes: Callable[[int], None] | None = None,
                chunk_bytes: int = IO_CHUNK_BYTES) -> str:
    """Hex SHA256 of a file, read ahead in a thread so that reading and hashing overlap."""
    hasher = WholeHasher()
    consumers: list[Consumer] = [hasher]
    if on_bytes is not None:
        consumers.append(CallbackConsumer(on_bytes))
    run_pipeline(file_segments([Path(path)]), consumers, chunk_bytes=chunk_bytes)
    return hasher.hexdigest()
