"""Join byte-split parts into one file, verifying the published SHA256 in the same pass.

The hash that decides "verified" is always taken from the bytes in the output file, whatever moves
them: ``copy_file_range`` copies each chunk inside the kernel and the reader then reads that chunk back
from the output (from the page cache, just written) for the whole-file and per-part hashers; ``readwrite``
hashes and writes the very same buffer; a reflinked output is hashed after the clone. A part that
changes during the join therefore cannot be called verified. The output is written to a temporary file
in the target folder and takes its final name only after the hash matched.

A rerun of a finished join (the output exists and matches the expected hash) says so and, with
``--delete-parts``, finishes deleting the parts, even when a killed run had already deleted some.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..constants import COPY_FILE_RANGE_MAX, IO_CHUNK_BYTES
from ..errors import ChecksumMismatchError, GptqToolsError, PartSetError, UsageError
from ..progress import byte_bar
from .fileio import (
    advise_sequential,
    atomic_path,
    check_free_space,
    check_output_free,
    open_nofollow,
    prefetch_range,
    raise_if_no_space,
    unlink,
    write_all,
)
from .manifest import is_sha256, parse_manifest
from .parts import PartSet, check_safetensors_parts, find_part_set, parse_part_name, part_set_from_paths
from .pipeline import CallbackConsumer, Consumer, PwriteConsumer, Segment, SegmentHasher, WholeHasher, run_pipeline

logger = logging.getLogger(__name__)

JOIN_METHODS = ("auto", "reflink", "copy_file_range", "readwrite")
_FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
DEFAULT_MANIFEST_NAMES = ("SHA256SUMS", "SHA256SUMS.txt", "sha256sums.txt")


@dataclass(frozen=True)
class ExpectedHashes:
    """What a join is checked against: the whole file's hash and, where known, each part's."""

    whole: str | None = None
    parts: dict[str, str] = field(default_factory=dict)
    source: str = ""
    manifest: Path | None = None

    def covers(self, part_set: PartSet) -> bool:
        """Whether a match proves the joined bytes: the whole hash, or every part's hash, is known."""
        return bool(self.whole) or (bool(self.parts) and all(p.name in self.parts for p in part_set.parts))


@dataclass(frozen=True)
class JoinResult:
    """What :func:`join_parts` did."""

    output: Path
    sha256: str
    part_sha256: dict[str, str]
    total_bytes: int
    verified: bool
    method: str
    expected_source: str = ""
    deleted_parts: tuple[Path, ...] = ()
    already_done: bool = False  # the output was already there, joined and verified (a rerun)


def resolve_part_set(parts: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> PartSet:
    """A part set from explicit parts (in order), or from a folder / one part (found and ordered)."""
    if isinstance(parts, (str, os.PathLike)):
        return find_part_set(parts)
    paths = [Path(p) for p in parts]
    if len(paths) == 1:
        return find_part_set(paths[0])
    _check_given_order(paths)
    return part_set_from_paths(paths)


def _check_given_order(paths: list[Path]) -> None:
    """Parts given explicitly whose names say another order are a mistake (swapped arguments)."""
    try:
        named = find_part_set(paths[0])
    except GptqToolsError:
        return
    if set(named.parts) == set(paths) and list(named.parts) != paths:
        given = ", ".join(p.name for p in paths)
        raise PartSetError(f"parts given out of order ({given}); their names say "
                           f"{', '.join(p.name for p in named.parts)}. Pass them in that order, or just the folder")


def expected_hashes(part_set: PartSet, *, expected_sha256: str | None = None,
                    manifest: str | os.PathLike[str] | None = None, output_name: str | None = None,
                    expected_source: str | None = None) -> ExpectedHashes:
    """Collect the expected hashes from ``--sha256``, a manifest, or a ``SHA256SUMS`` beside the parts.

    Raises:
        UsageError: ``expected_sha256`` is not 64 hex digits, or the manifest does not name the file.
        ManifestError: the manifest does not parse or names unsafe paths.
    """
    name = output_name or part_set.output_name
    if expected_sha256 is not None and not is_sha256(expected_sha256.strip()):
        raise UsageError(f"--sha256 {expected_sha256!r} is not a SHA256 (64 hex digits)")
    manifest_path = Path(manifest) if manifest else None
    if manifest_path is None and expected_sha256 is None:
        manifest_path = next((part_set.folder / n for n in DEFAULT_MANIFEST_NAMES if (part_set.folder / n).is_file()),
                             None)
    entries = parse_manifest(manifest_path) if manifest_path else {}
    part_hashes = {p.name: entries[p.name] for p in part_set.parts if p.name in entries}
    whole = expected_sha256.strip().lower() if expected_sha256 else entries.get(name, entries.get(part_set.output_name))
    if manifest and whole is None and not part_hashes:
        raise UsageError(f"{manifest}: names neither {name} nor any of its parts; pass --sha256 or another manifest")
    source = ((expected_source or "--sha256") if expected_sha256
              else str(manifest_path) if manifest_path and (whole or part_hashes) else "")
    return ExpectedHashes(whole=whole, parts=part_hashes, source=source, manifest=manifest_path)


def join_parts(parts: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
               output: str | os.PathLike[str] | None = None, *, expected_sha256: str | None = None,
               manifest: str | os.PathLike[str] | None = None, force: bool = False, delete_parts: bool = False,
               method: str = "auto", progress: bool | None = None, expected_source: str | None = None) -> JoinResult:
    """Concatenate split parts into one verified file.

    Args:
        parts: the parts in order, or a folder / one part (the set is found and ordered).
        output: the joined file, or a folder to put it in (default: beside the parts, under the set's name).
        expected_sha256: the published SHA256 of the joined file.
        manifest: a sha256sum-format manifest naming the joined file (and possibly each part).
            Without either, a ``SHA256SUMS`` beside the parts is used when present.
        force: overwrite an existing output (never a part, nor the manifest the join is checked against).
            Without it, an existing output that already matches the expected hash is a finished job: the
            result says ``already_done`` and nothing is rewritten.
        delete_parts: delete the parts once the output is verified (needs an expected hash); a rerun after
            a run killed mid-deletion finishes it when the joined file's own hash is known.
        method: ``auto`` (reflink where the filesystem allows it, else ``copy_file_range``, which the
            benchmark found fastest, falling back to ``readwrite`` where the kernel refuses it),
            ``reflink``, ``copy_file_range`` or ``readwrite``.
        progress: show a progress bar (None: automatic).
        expected_source: where ``expected_sha256`` comes from, for messages (default ``--sha256``; a
            download passes ``preset NAME``).

    Returns:
        A :class:`JoinResult`; ``verified`` is False when no expected hash was known.

    Raises:
        PartSetError, LfsPointerError: the parts are incomplete, out of order, stray, pointers, or one
            changed size while being joined.
        ChecksumMismatchError: the bytes written to the output do not match (the output is not kept).
        UsageError: the output would replace a part or the manifest, or the options conflict.
        OutputExistsError, OutputNotWritableError, InsufficientSpaceError.
    """
    if method not in JOIN_METHODS:
        raise UsageError(f"unknown join method {method!r}; use one of {', '.join(JOIN_METHODS)}")
    try:
        part_set = resolve_part_set(parts)
    except PartSetError:
        finished = None if force else _finished_without_parts(parts, output, expected_sha256, manifest, delete_parts)
        if finished is None:
            raise
        return finished
    final = _output_path(part_set, output)
    _check_output_is_not_a_part(final, part_set)
    expected = expected_hashes(part_set, expected_sha256=expected_sha256, manifest=manifest, output_name=final.name,
                               expected_source=expected_source)
    _check_output_is_not_the_manifest(final, expected)
    if delete_parts and not expected.covers(part_set):
        raise UsageError("--delete-parts needs an expected hash (--sha256 or a manifest): parts are only deleted "
                         "after the joined file is verified")
    if final.exists() and not force:
        finished = _finished_join(part_set, final, expected, delete_parts)
        if finished is not None:
            return finished
    check_output_free(final, force=force, why="" if expected.covers(part_set) else (
        " and, with no expected hash, cannot be told from a good join (pass --sha256 HEX or --manifest "
        "SHA256SUMS to check it and keep it)"))
    if final.name.endswith(".safetensors"):
        check_parts_structure(part_set, expected, output=final.name)
    with atomic_path(final, force=force) as temp:
        used_method, whole, part_digests = _write_and_hash(part_set, temp, final, method, progress)
        _check_hashes(part_set, final, expected, whole, part_digests)
    deleted = _delete_parts(part_set.parts) if delete_parts else ()
    verified = expected.covers(part_set)
    if verified:
        logger.info("%s: joined %d parts, SHA256 %s verified against %s", final, len(part_set.parts), whole,
                    expected.source)
    else:
        logger.warning("%s: joined %d parts, SHA256 %s; NOT verified (no expected hash given: pass --sha256 "
                       "or --manifest)", final, len(part_set.parts), whole)
    return JoinResult(output=final, sha256=whole, part_sha256=dict(zip((p.name for p in part_set.parts), part_digests)),
                      total_bytes=part_set.total_size, verified=verified, method=used_method,
                      expected_source=expected.source, deleted_parts=deleted)


def _output_path(part_set: PartSet, output: str | os.PathLike[str] | None) -> Path:
    if output is None:
        return part_set.folder / part_set.output_name
    path = Path(output)
    return path / part_set.output_name if path.is_dir() else path


def _check_output_is_not_a_part(final: Path, part_set: PartSet) -> None:
    for part in part_set.parts:
        if _same_file(final, part):
            raise UsageError(f"{final}: the output would overwrite part {part.name}; choose another output name")


def _check_output_is_not_the_manifest(final: Path, expected: ExpectedHashes) -> None:
    """Even with --force, the output may not replace the manifest the join is verified against."""
    if expected.manifest is not None and _same_file(final, expected.manifest):
        raise UsageError(f"{final}: the output would overwrite the manifest the join is verified against; "
                         f"choose another output name")


def _same_file(first: Path, second: Path) -> bool:
    if first.resolve() == second.resolve():
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _finished_join(part_set: PartSet, final: Path, expected: ExpectedHashes, delete_parts: bool) -> JoinResult | None:
    """A result when ``final`` already holds the verified join of ``part_set`` (a rerun), else None.

    The existing output is hashed whole and at each part's range, and must match every expected hash.
    """
    if not expected.covers(part_set) or final.stat().st_size != part_set.total_size:
        return None
    whole, per_part = WholeHasher(), SegmentHasher(len(part_set.parts))
    segments = [Segment(final, start, size) for start, size in zip(_offsets(part_set), part_set.sizes)]
    run_pipeline(segments, [whole, per_part])
    try:
        _check_hashes(part_set, final, expected, whole.hexdigest(), per_part.hexdigests())
    except ChecksumMismatchError:
        return None
    return _already_done(final, whole.hexdigest(), dict(zip((p.name for p in part_set.parts), per_part.hexdigests())),
                         part_set.total_size, expected.source, part_set.parts if delete_parts else ())


def _finished_without_parts(parts: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
                            output: str | os.PathLike[str] | None, expected_sha256: str | None,
                            manifest: str | os.PathLike[str] | None, delete_parts: bool) -> JoinResult | None:
    """A rerun after some (or all) parts were deleted by ``--delete-parts``: when the output already exists
    and matches the joined file's expected SHA256 (``--sha256`` or a manifest entry for it), the job is
    done and the remaining parts (with ``delete_parts``) are deleted. None when that cannot be shown.

    The output is the file the remaining part names (or the manifest's part entries) say; when no part
    is left and nothing names it, it is the file in the output folder whose SHA256 is the expected one.
    """
    given = [Path(parts)] if isinstance(parts, (str, os.PathLike)) else [Path(p) for p in parts]
    folder = given[0] if given[0].is_dir() else given[0].parent
    manifest_path = Path(manifest) if manifest else next(
        (folder / n for n in DEFAULT_MANIFEST_NAMES if (folder / n).is_file()), None)
    entries = parse_manifest(manifest_path) if manifest_path is not None and manifest_path.is_file() else {}
    given_hash = expected_sha256.strip().lower() if expected_sha256 else None
    names = [p.name for p in given if not p.is_dir()] or [*os.listdir(folder), *entries]
    outputs = {parsed.output_name for parsed in map(parse_part_name, names) if parsed is not None}
    output_name = outputs.pop() if len(outputs) == 1 else None
    if output_name is not None:
        target = Path(output) if output is not None else folder / output_name
        candidates = [target / output_name if target.is_dir() else target]
        whole = given_hash or entries.get(candidates[0].name, entries.get(output_name))
    elif not outputs and given_hash is not None and given[0].is_dir():
        target = Path(output) if output is not None else folder
        candidates = [target] if target.is_file() else sorted(
            (p for p in target.iterdir() if p.is_file() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_size, reverse=True)
        whole = given_hash
    else:
        return None
    from .pipeline import sha256_file

    final = next((c for c in candidates if whole and c.is_file() and sha256_file(c) == whole), None)
    if final is None or whole is None:
        return None
    if len(given) > 1 or not folder.is_dir():
        remaining = tuple(p for p in given if p.is_file())
    else:
        remaining = tuple(folder / name for name in sorted(os.listdir(folder))
                          if (parsed := parse_part_name(name)) is not None and parsed.output_name == output_name
                          and (folder / name).is_file() and not _same_file(folder / name, final))
    source = "--sha256" if expected_sha256 else str(manifest_path)
    return _already_done(final, whole, {}, final.stat().st_size, source, remaining if delete_parts else ())


def _already_done(final: Path, whole: str, part_sha256: dict[str, str], total: int, source: str,
                  to_delete: Sequence[Path]) -> JoinResult:
    logger.info("%s: already joined and verified (SHA256 %s matches %s)", final, whole, source)
    deleted = _delete_parts(to_delete)
    return JoinResult(output=final, sha256=whole, part_sha256=part_sha256, total_bytes=total, verified=True,
                      method="none", expected_source=source, deleted_parts=deleted, already_done=True)


def _write_and_hash(part_set: PartSet, temp: Path, final: Path, method: str,
                    progress: bool | None) -> tuple[str, str, list[str]]:
    """Write the joined bytes to ``temp`` and hash them; returns (method used, whole hash, part hashes).
    Errors name ``final``, the file the user asked for, not its temporary."""
    total = part_set.total_size
    with open(open_nofollow(temp, os.O_RDWR), "r+b") as out:
        used = "reflink" if method in ("auto", "reflink") and _try_reflink(part_set, out.fileno(), method) else None
        if used is None:
            used = "copy_file_range" if method == "auto" else method
            _preallocate(out.fileno(), total, final)
        whole, per_part = WholeHasher(), SegmentHasher(len(part_set.parts))
        consumers: list[Consumer] = [whole, per_part]
        copier: _RangeCopier | None = None
        if used in ("reflink", "copy_file_range"):  # hash what is in the output, not a second read of the parts
            segments = [Segment(temp, start, size) for start, size in zip(_offsets(part_set), part_set.sizes)]
            copier = _RangeCopier(out.fileno(), part_set, final) if used == "copy_file_range" else None
        else:  # readwrite: the buffer that is hashed is the buffer that is written
            segments = [Segment(p, 0, s) for p, s in zip(part_set.parts, part_set.sizes)]
            consumers.append(PwriteConsumer([out.fileno()] * len(part_set.parts), _offsets(part_set),
                                            [final] * len(part_set.parts)))
        try:
            with byte_bar(total, f"join {part_set.output_name}", enabled=progress) as bar:
                consumers.append(CallbackConsumer(bar.update))
                run_pipeline(segments, consumers, before_read=copier.wait_for if copier else None)
        finally:
            if copier is not None:
                copier.close()
        try:
            out.flush()
            os.fsync(out.fileno())
        except OSError as exc:
            raise_if_no_space(exc, final)
            raise
    return used, whole.hexdigest(), per_part.hexdigests()


def _offsets(part_set: PartSet) -> list[int]:
    offsets, position = [], 0
    for size in part_set.sizes:
        offsets.append(position)
        position += size
    return offsets


def _preallocate(fd: int, total: int, final: Path) -> None:
    """Reserve the space up front: a full disk fails now, before any work, not at 95%."""
    if total == 0:
        return
    check_free_space(final.parent, total, what="joining")
    try:
        os.posix_fallocate(fd, 0, total)
    except OSError as exc:
        raise_if_no_space(exc, final)
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


class _RangeCopier:
    """Copies the parts into the output inside the kernel (``copy_file_range``: page cache to page cache,
    no copy through this process) on a thread of its own, a few chunks ahead of the pipeline, which reads
    each chunk back from the output for hashing only once it has been copied (:meth:`wait_for`). Where
    the kernel or filesystem refuses it (cross-device on old kernels, FUSE, ...), the chunk is copied with
    ``pread``/``pwrite`` instead, and so are all later ones."""

    def __init__(self, fd: int, part_set: PartSet, target: Path, *, chunk_bytes: int = IO_CHUNK_BYTES,
                 ahead: int = 4) -> None:
        self.fd, self.target, self.parts = fd, target, part_set.parts
        self.starts, self.sizes = _offsets(part_set), part_set.sizes
        self.chunk_bytes, self.ahead = chunk_bytes, ahead
        self.sources: list[int] = []
        try:
            for part in part_set.parts:
                self.sources.append(os.open(part, os.O_RDONLY))
                advise_sequential(self.sources[-1])
        except OSError:
            self.close()
            raise
        self.in_kernel = True
        self.copied = self.hashed = 0  # output offsets: copied so far, handed to the hashers so far
        self.error: BaseException | None = None
        self.stopping = False
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True, name="join-copy")
        self.thread.start()

    def _run(self) -> None:
        try:
            for index, size in enumerate(self.sizes):
                for position in range(0, size, self.chunk_bytes):
                    with self.condition:
                        while not self.stopping and self.copied - self.hashed >= self.ahead * self.chunk_bytes:
                            self.condition.wait()
                        if self.stopping:
                            return
                    length = min(self.chunk_bytes, size - position)
                    self.copy(index, position, length)
                    with self.condition:
                        self.copied = self.starts[index] + position + length
                        self.condition.notify_all()
        except BaseException as exc:  # noqa: BLE001 - raised in the pipeline's reader by wait_for
            with self.condition:
                self.error = exc
                self.condition.notify_all()

    def wait_for(self, segment_index: int, position: int, length: int) -> None:
        """Block until ``length`` bytes at ``position`` of part ``segment_index`` are in the output."""
        start = self.starts[segment_index] + position
        with self.condition:
            self.hashed = start
            self.condition.notify_all()
            while self.copied < start + length and self.error is None:
                self.condition.wait()
            if self.error is not None:
                raise self.error

    def copy(self, segment_index: int, position: int, length: int) -> None:
        source, dst = self.sources[segment_index], self.starts[segment_index] + position
        prefetch_range(source, position + length, 2 * length)  # keep the disk busy while this chunk copies
        done = 0
        try:
            while done < length and self.in_kernel:
                copied = os.copy_file_range(source, self.fd, min(length - done, COPY_FILE_RANGE_MAX),
                                            position + done, dst + done)
                if copied == 0:
                    self._shrank(segment_index, position + done, position + length)
                done += copied
        except OSError as exc:
            raise_if_no_space(exc, self.target)
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                raise
            logger.debug("copy_file_range refused (%s); copying through this process instead", exc.strerror)
            self.in_kernel = False
        while done < length:
            data = os.pread(source, min(length - done, COPY_FILE_RANGE_MAX), position + done)
            if not data:
                self._shrank(segment_index, position + done, position + length)
            write_all(self.fd, data, offset=dst + done, target=self.target)  # loops over short writes
            done += len(data)

    def _shrank(self, segment_index: int, at: int, wanted: int) -> None:
        raise PartSetError(f"{self.parts[segment_index]}: ended at byte {at} while {wanted} were expected; it "
                           f"changed while being joined. Let whatever writes it finish, then join again")

    def close(self) -> None:
        if hasattr(self, "thread"):
            with self.condition:
                self.stopping = True
                self.condition.notify_all()
            self.thread.join()
        for fd in self.sources:
            os.close(fd)
        self.sources = []


def _try_reflink(part_set: PartSet, fd: int, method: str) -> bool:
    """Clone every part into ``fd`` (FICLONERANGE); False when the filesystem or alignment does not allow it."""
    block = os.fstatvfs(fd).f_bsize
    sizes = part_set.sizes
    if any(size % block for size in sizes[:-1]):
        if method == "reflink":
            raise UsageError(f"reflink needs every part but the last to be a multiple of {block} bytes; "
                             f"use --method auto")
        return False
    position = 0
    try:
        for part, size in zip(part_set.parts, sizes):
            with open(part, "rb") as source:
                length = size if size % block == 0 else 0  # 0 clones to the end of the source file
                request = (source.fileno().to_bytes(8, "little", signed=True) + (0).to_bytes(8, "little")
                           + length.to_bytes(8, "little") + position.to_bytes(8, "little"))
                fcntl.ioctl(fd, _FICLONERANGE, request)
            position += size
    except OSError as exc:
        if method == "reflink":
            raise UsageError(f"reflink is not possible here ({exc.strerror}); use --method auto") from None
        os.ftruncate(fd, 0)
        logger.debug("reflink not available (%s); copying instead", exc.strerror)
        return False
    return True


def _check_hashes(part_set: PartSet, final: Path, expected: ExpectedHashes, whole: str,
                  part_digests: list[str]) -> None:
    names = [p.name for p in part_set.parts]
    actual_parts = dict(zip(names, part_digests))
    bad_parts = [n for n, digest in expected.parts.items() if actual_parts.get(n) != digest]
    if bad_parts or (expected.whole and whole != expected.whole):
        raise ChecksumMismatchError(_mismatch_message(final, expected, whole, actual_parts, bad_parts))


def check_parts_structure(part_set: PartSet, expected: ExpectedHashes, *, output: str) -> None:
    """The safetensors check of the parts' first bytes, with the real cause when it fails and part hashes are
    known: a swap that moved another part to the front (only the hashes can tell which).

    Raises:
        ChecksumMismatchError: the parts hold each other's bytes (by the expected part hashes).
        SafetensorsFormatError, PartSetError: the parts do not form a safetensors file, for another reason.
    """
    try:
        check_safetensors_parts(part_set)
    except GptqToolsError:
        if not expected.parts or not all(p.name in expected.parts for p in part_set.parts):
            raise
        hasher = SegmentHasher(len(part_set.parts))
        run_pipeline([Segment(p, 0, s) for p, s in zip(part_set.parts, part_set.sizes)], [hasher])
        actual = dict(zip((p.name for p in part_set.parts), hasher.hexdigests()))
        moved = misplaced_parts(expected.parts, actual)
        if not moved:
            raise
        raise ChecksumMismatchError(f"{output}: {moved} (by the part SHA256s in {expected.source}); put each part's "
                                    f"bytes back under its own name, or pass the parts in the right order. Nothing "
                                    f"was written") from None


def misplaced_parts(expected: dict[str, str], actual: dict[str, str]) -> str:
    """How the parts were moved, when every wrong part holds the bytes another part should (any pair, the first
    part too): ``"parts a and c are swapped"``, or ``"parts are out of order: a holds b, b holds c, ..."``.
    Empty when some part's bytes belong to no part (corrupt, not misplaced)."""
    owner = {digest: name for name, digest in expected.items()}
    wrong = {name: owner.get(digest) for name, digest in actual.items() if expected.get(name) != digest}
    if not wrong or any(holds is None for holds in wrong.values()):
        return ""
    if len(wrong) == 2:
        first, second = sorted(wrong)
        return f"parts {first} and {second} are swapped"
    return "parts are out of order: " + ", ".join(f"{name} holds {holds}" for name, holds in sorted(wrong.items()))


def _mismatch_message(final: Path, expected: ExpectedHashes, whole: str, actual_parts: dict[str, str],
                      bad_parts: list[str]) -> str:
    base = f"{final.name}: SHA256 mismatch"
    if expected.whole:
        base += f" (expected {expected.whole}, got {whole}, from {expected.source})"
    if bad_parts:
        moved = misplaced_parts({n: expected.parts[n] for n in actual_parts if n in expected.parts}, actual_parts)
        if moved:
            return f"{base}: {moved}; pass them in the right order. Nothing was written"
        return (f"{base}: part(s) {', '.join(bad_parts)} do not match the manifest; download them again. "
                f"Nothing was written")
    return (f"{base}: a part is corrupt or the parts are in the wrong order; check the order or download the "
            f"parts again. Nothing was written")


def _delete_parts(parts: Sequence[Path]) -> tuple[Path, ...]:
    """Delete the parts (the joined file was verified); a part a killed run already deleted is skipped."""
    for part in parts:
        unlink(part, missing_ok=True)
        logger.info("deleted %s (the joined file was verified)", part)
    return tuple(parts)
