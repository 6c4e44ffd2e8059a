"""Join byte-split parts into one file, verifying the published SHA256 in the same pass.

Every byte is read once: a reader thread feeds the whole-file hasher, the per-part hasher and the
writer, each on its own thread. The output is written to a temporary file in the target folder and
takes its final name only after the hash matched. Where the filesystem can share blocks (reflink,
``FICLONERANGE`` on XFS/btrfs) and the parts are block-aligned, the output is cloned instead of copied
and only the hashing pass remains.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ChecksumMismatchError, GptqToolsError, PartSetError, UsageError
from .fileio import atomic_path, check_free_space, check_output_free, raise_if_no_space
from .manifest import is_sha256, parse_manifest
from .parts import PartSet, check_safetensors_parts, find_part_set, part_set_from_paths
from .pipeline import CallbackConsumer, Consumer, PwriteConsumer, Segment, SegmentHasher, WholeHasher, run_pipeline
from .progress import byte_bar

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
                    manifest: str | os.PathLike[str] | None = None, output_name: str | None = None) -> ExpectedHashes:
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
    source = "--sha256" if expected_sha256 else str(manifest_path) if manifest_path and (whole or part_hashes) else ""
    return ExpectedHashes(whole=whole, parts=part_hashes, source=source)


def join_parts(parts: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
               output: str | os.PathLike[str] | None = None, *, expected_sha256: str | None = None,
               manifest: str | os.PathLike[str] | None = None, force: bool = False, delete_parts: bool = False,
               method: str = "auto", progress: bool | None = None) -> JoinResult:
    """Concatenate split parts into one verified file.

    Args:
        parts: the parts in order, or a folder / one part (the set is found and ordered).
        output: the joined file, or a folder to put it in (default: beside the parts, under the set's name).
        expected_sha256: the published SHA256 of the joined file.
        manifest: a sha256sum-format manifest naming the joined file (and possibly each part).
            Without either, a ``SHA256SUMS`` beside the parts is used when present.
        force: overwrite an existing output.
        delete_parts: delete the parts once the output is verified (needs an expected hash).
        method: ``auto`` (reflink where the filesystem allows it, else ``copy_file_range``, which the
            benchmark found fastest, falling back to ``readwrite`` where the kernel refuses it),
            ``reflink``, ``copy_file_range`` or ``readwrite``.
        progress: show a progress bar (None: automatic).

    Returns:
        A :class:`JoinResult`; ``verified`` is False when no expected hash was known.

    Raises:
        PartSetError, LfsPointerError: the parts are incomplete, out of order, stray, or pointers.
        ChecksumMismatchError: the joined bytes do not match (the output is not kept).
        OutputExistsError, InsufficientSpaceError, UsageError.
    """
    if method not in JOIN_METHODS:
        raise UsageError(f"unknown join method {method!r}; use one of {', '.join(JOIN_METHODS)}")
    part_set = resolve_part_set(parts)
    final = _output_path(part_set, output)
    _check_output_is_not_a_part(final, part_set)
    check_output_free(final, force=force)
    expected = expected_hashes(part_set, expected_sha256=expected_sha256, manifest=manifest, output_name=final.name)
    if delete_parts and not expected.covers(part_set):
        raise UsageError("--delete-parts needs an expected hash (--sha256 or a manifest): parts are only deleted "
                         "after the joined file is verified")
    if final.name.endswith(".safetensors"):
        check_safetensors_parts(part_set)
    with atomic_path(final, force=force) as temp:
        used_method, whole, part_digests = _write_and_hash(part_set, temp, final, method, progress)
        _check_hashes(part_set, final, expected, whole, part_digests)
    deleted = _delete_parts(part_set) if delete_parts else ()
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
        if final.resolve() == part.resolve() or (final.exists() and os.path.samefile(final, part)):
            raise UsageError(f"{final}: the output would overwrite part {part.name}; choose another output name")


def _write_and_hash(part_set: PartSet, temp: Path, final: Path, method: str,
                    progress: bool | None) -> tuple[str, str, list[str]]:
    """Write the joined bytes to ``temp`` and hash them; returns (method used, whole hash, part hashes).
    Errors name ``final``, the file the user asked for, not its temporary."""
    total = part_set.total_size
    with open(temp, "r+b") as out:
        used = "reflink" if method in ("auto", "reflink") and _try_reflink(part_set, out.fileno(), method) else None
        if used is None:
            used = "copy_file_range" if method == "auto" else method
            _preallocate(out.fileno(), total, final)
        whole, per_part = WholeHasher(), SegmentHasher(len(part_set.parts))
        consumers: list[Consumer] = [whole, per_part]
        if used == "reflink":
            offsets = _offsets(part_set)
            segments = [Segment(temp, start, size) for start, size in zip(offsets, part_set.sizes)]
        else:
            segments = [Segment(p, 0, s) for p, s in zip(part_set.parts, part_set.sizes)]
            consumers.append(_writer(used, out.fileno(), part_set, final))
        with byte_bar(total, f"join {part_set.output_name}", enabled=progress) as bar:
            consumers.append(CallbackConsumer(bar.update))
            run_pipeline(segments, consumers)
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


class _CopyRangeConsumer(Consumer):
    """Copies each chunk's range inside the kernel (``copy_file_range``: page cache to page cache, no
    copy through this process). Where the kernel or filesystem refuses it (cross-device on old kernels,
    FUSE, ...), the chunk already read for hashing is written instead, and so are all later ones."""

    def __init__(self, fd: int, part_set: PartSet, target: Path) -> None:
        self.fd, self.target = fd, target
        self.starts = _offsets(part_set)
        self.sources = [os.open(p, os.O_RDONLY) for p in part_set.parts]
        self.fallback: PwriteConsumer | None = None

    def consume(self, segment_index: int, position: int, data: memoryview) -> None:
        if self.fallback is not None:
            self.fallback.consume(segment_index, position, data)
            return
        done, src, dst = 0, position, self.starts[segment_index] + position
        try:
            while done < len(data):
                copied = os.copy_file_range(self.sources[segment_index], self.fd, min(len(data) - done, 1 << 30),
                                            src, dst)
                if copied == 0:
                    raise PartSetError(f"{self.target}: copy_file_range stopped early at offset {dst}")
                done, src, dst = done + copied, src + copied, dst + copied
        except OSError as exc:
            raise_if_no_space(exc, self.target)
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                raise
            logger.debug("copy_file_range refused (%s); writing through this process instead", exc.strerror)
            self.fallback = PwriteConsumer([self.fd] * len(self.starts), self.starts,
                                           [self.target] * len(self.starts))
            self.fallback.consume(segment_index, position + done, data[done:])

    def finish(self) -> None:
        for fd in self.sources:
            os.close(fd)


def _writer(method: str, fd: int, part_set: PartSet, target: Path) -> Consumer:
    if method == "copy_file_range":
        return _CopyRangeConsumer(fd, part_set, target)
    return PwriteConsumer([fd] * len(part_set.parts), _offsets(part_set), [target] * len(part_set.parts))


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


def _mismatch_message(final: Path, expected: ExpectedHashes, whole: str, actual_parts: dict[str, str],
                      bad_parts: list[str]) -> str:
    base = f"{final.name}: SHA256 mismatch"
    if expected.whole:
        base += f" (expected {expected.whole}, got {whole}, from {expected.source})"
    if bad_parts:
        swapped = [(n, other) for n in bad_parts for other, digest in actual_parts.items()
                   if other != n and digest == expected.parts[n]]
        if swapped:
            first, second = swapped[0]
            return f"{base}: parts {first} and {second} are swapped; pass them in the right order. Nothing was written"
        return (f"{base}: part(s) {', '.join(bad_parts)} do not match the manifest; download them again. "
                f"Nothing was written")
    return (f"{base}: a part is corrupt or the parts are in the wrong order; check the order or download the "
            f"parts again. Nothing was written")


def _delete_parts(part_set: PartSet) -> tuple[Path, ...]:
    for part in part_set.parts:
        part.unlink()
        logger.info("deleted %s (the joined file was verified)", part)
    return part_set.parts
