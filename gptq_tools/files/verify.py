"""Verify files against expected SHA256s (``sha256sum -c`` semantics), and parts without joining them.

Several files are hashed in parallel threads (hashlib releases the GIL), each with read-ahead, so
verification runs at the speed of the disk or of the cores, whichever is lower. A file listed several
times is hashed once.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from ..constants import IO_CHUNK_BYTES
from ..errors import ManifestError, UsageError
from ..progress import byte_bar
from .join import check_parts_structure, expected_hashes, resolve_part_set
from .manifest import (
    STDIN_NAME,
    MalformedLine,
    ManifestParser,
    is_sha256,
    read_manifest_bytes,
    unsafe_name_reason,
)
from .pipeline import CallbackConsumer, Consumer, Segment, SegmentHasher, WholeHasher, run_pipeline, sha256_file
from .safetensors_format import LFS_POINTER_PREFIX

logger = logging.getLogger(__name__)

#: Files up to this size are read and hashed in one go; a Git LFS pointer file is always smaller.
_SMALL_FILE = 1024 * 1024

@dataclass(frozen=True)
class FileCheck:
    """The outcome for one file.

    ``status`` is ``OK``, ``FAILED`` (hash differs), ``MISSING`` (could not be opened or read: sha256sum's
    "FAILED open or read"), ``SKIPPED`` (absent, with ``ignore_missing``), ``UNVERIFIED`` (a check was asked
    for but no expected hash was found: never OK, in every mode) or ``HASHED`` (``sha256sum FILE``: only the
    hash was asked for). ``detail`` says why for anything but OK (for MISSING, the system's reason);
    ``note`` is advice worth a line on stderr (a Git LFS pointer where the data should be).
    """

    name: str
    path: str
    expected: str | None
    actual: str | None
    status: str
    detail: str = ""
    parts: dict[str, str] = field(default_factory=dict)
    line: int | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ManifestReport:
    """One manifest checked: its results in line order, its improperly formatted lines, or why it is unread.

    ``error`` is set when the manifest itself could not be read (then nothing else is); ``error_is_os``
    says it is the system's reason (``strerror``, which sha256sum prints after the name) rather than a
    refusal of ours (a folder, a device, too large).
    """

    source: str
    results: tuple[FileCheck, ...] = ()
    malformed: tuple[MalformedLine, ...] = ()
    error: str | None = None
    error_is_os: bool = False

    def count(self, status: str) -> int:
        return sum(1 for result in self.results if result.status == status)

    def passed(self, *, strict: bool = False) -> bool:
        """sha256sum's verdict: something matched, nothing mismatched or unreadable (no bad line if strict)."""
        return (self.error is None and bool(self.results) and self.count("OK") > 0 and self.count("FAILED") == 0
                and self.count("MISSING") == 0 and not (strict and self.malformed))

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, "error": self.error,
                "malformed": [{"line": m.line, "reason": m.reason} for m in self.malformed],
                "results": [r.to_dict() for r in self.results]}


@dataclass(frozen=True)
class _Job:
    name: str
    path: Path | None  # None: refused before any file is opened (``detail`` says why)
    expected: str | None
    line: int | None = None
    detail: str = ""
    absent: bool = False  # refused because no such file can exist (an empty name): ``--ignore-missing`` skips it


@dataclass(frozen=True)
class _Digest:
    actual: str | None
    error: str | None = None
    missing: bool = False
    pointer: bool = False


def check_manifests(manifests: Sequence[str | os.PathLike[str]], *, ignore_missing: bool = False,
                    workers: int | None = None, progress: bool | None = None) -> list[ManifestReport]:
    """``sha256sum -c MANIFEST...``: check every file each manifest lists, as coreutils would.

    A name is looked up beside its manifest, then (where nothing is there) in the current folder, as
    sha256sum does (``-`` reads the manifest from standard input; its names are relative to the current
    folder). Improperly formatted lines are collected, not fatal. A
    manifest that cannot be read gives a report with ``error`` set, and the others are still checked.

    Args:
        manifests: manifest files, ``-`` for standard input.
        ignore_missing: absent files get status ``SKIPPED`` instead of ``MISSING``.
        workers: files hashed at once (default: the number of cores).
        progress: show a progress bar (None: automatic).

    Returns:
        One :class:`ManifestReport` per manifest, in order.
    """
    parser = ManifestParser()
    loaded: list[tuple[str, list[_Job], tuple[MalformedLine, ...], str | None, bool]] = []
    for manifest in manifests:
        shown = STDIN_NAME if str(manifest) == "-" else str(manifest)
        try:
            data = read_manifest_bytes(manifest)
        except ManifestError as exc:
            loaded.append((shown, [], (), str(exc), False))
            continue
        except OSError as exc:
            loaded.append((shown, [], (), exc.strerror or str(exc), True))
            continue
        parsed = parser.parse(data, source=shown, from_stdin=str(manifest) == "-")
        folder = Path(".") if str(manifest) == "-" else Path(manifest).parent
        jobs = [_entry_job(entry.name, folder, entry.sha256, entry.line) for entry in parsed.entries]
        loaded.append((shown, jobs, tuple(parsed.malformed), None, False))
    checks = iter(_run_jobs([job for _, jobs, _, _, _ in loaded for job in jobs], ignore_missing=ignore_missing,
                            workers=workers, progress=progress))
    return [ManifestReport(shown, tuple(next(checks) for _ in jobs), malformed, error, error_is_os)
            for shown, jobs, malformed, error, error_is_os in loaded]


def _entry_job(name: str, folder: Path, expected: str, line: int | None) -> _Job:
    if not name:
        return _Job(name, None, expected, line, os.strerror(errno.ENOENT), absent=True)
    reason = unsafe_name_reason(name)
    if reason is not None:
        return _Job(name, None, expected, line, f"refusing {reason}: names in a manifest stay inside its folder")
    if name.endswith(("/", "/.")):
        return _trailing_slash_job(name, folder, expected, line)
    beside = folder / name
    if not os.path.lexists(beside) and os.path.lexists(name):  # written from the current folder, as sha256sum reads it
        return _Job(name, Path(name), expected, line)
    return _Job(name, beside, expected, line)


def _trailing_slash_job(name: str, folder: Path, expected: str, line: int | None) -> _Job:
    """A name ending in ``/`` or ``/.`` is opened as written, as sha256sum does: a file there is "Not a
    directory", a folder "Is a directory". (``Path`` would drop the ending and check the file.)"""
    raw = name if str(folder) == "." or os.path.isabs(name) else os.path.join(folder, name)
    try:
        info = os.stat(raw)
    except OSError as exc:
        return _Job(name, None, expected, line, exc.strerror or str(exc), absent=isinstance(exc, FileNotFoundError))
    detail = os.strerror(errno.EISDIR) if stat.S_ISDIR(info.st_mode) else os.strerror(errno.ENOTDIR)
    return _Job(name, None, expected, line, detail)


def hash_files(files: Sequence[str | os.PathLike[str]], *, workers: int | None = None,
               progress: bool | None = None) -> list[FileCheck]:
    """``sha256sum FILE...``: the SHA256 of each file (``-`` is standard input), status ``HASHED``.

    A file that cannot be read gets status ``MISSING`` with the system's reason in ``detail``.
    """
    results = _run_jobs([_Job(str(f), Path(f), None) for f in files], workers=workers, progress=progress)
    return [replace(r, status="HASHED", detail="") if r.status == "UNVERIFIED" else r for r in results]


def verify_files(files: Sequence[str | os.PathLike[str]] = (), *, sha256: str | None = None,
                 manifest: str | os.PathLike[str] | None = None, workers: int | None = None,
                 ignore_missing: bool = False, progress: bool | None = None) -> list[FileCheck]:
    """Hash files and compare them with the expected SHA256s.

    Args:
        files: files to check. With a manifest and no files, every file the manifest names is checked
            (paths relative to the manifest's folder); with files, only those (by name).
        sha256: the expected hash, when checking exactly one file.
        manifest: a sha256sum-format manifest (improperly formatted lines are skipped with a warning).
        workers: files hashed at once (default: the number of cores, at most the number of files).
        ignore_missing: absent files get status ``SKIPPED`` (``sha256sum --ignore-missing``).
        progress: show a progress bar (None: automatic).

    Returns:
        One :class:`FileCheck` per file, in order.

    Raises:
        UsageError: nothing to check, a file the manifest does not list, or no expected hash for a file.
        ManifestError: the manifest cannot be read.
    """
    if sha256 is not None:
        if not is_sha256(sha256.strip()):
            raise UsageError(f"--sha256 {sha256!r} is not a SHA256 (64 hex digits)")
        if len(files) != 1:
            raise UsageError("--sha256 checks exactly one file; use a manifest for several")
        return _run_jobs([_Job(str(files[0]), Path(files[0]), sha256.strip().lower())], workers=workers,
                         progress=progress)
    if manifest is None:
        raise UsageError("nothing to verify against: pass --sha256 HEX or a manifest (-c SHA256SUMS)")
    if not files:
        report = check_manifests([manifest], ignore_missing=ignore_missing, workers=workers, progress=progress)[0]
        if report.error is not None:
            raise ManifestError(report.error)
        for bad in report.malformed:
            logger.warning("%s: %d: %s", report.source, bad.line, bad.reason)
        return list(report.results)
    return _run_jobs(_selected_jobs(files, manifest), ignore_missing=ignore_missing, workers=workers,
                     progress=progress)


def _selected_jobs(files: Sequence[str | os.PathLike[str]], manifest: str | os.PathLike[str]) -> list[_Job]:
    try:
        data = read_manifest_bytes(manifest)
    except OSError as exc:
        raise ManifestError(f"{manifest}: cannot read the manifest: {exc.strerror or exc}") from None
    parsed = ManifestParser().parse(data, source=str(manifest), from_stdin=str(manifest) == "-")
    folder = Path(".") if str(manifest) == "-" else Path(manifest).parent
    by_name = {entry.name: entry for entry in parsed.entries}
    jobs = []
    for item in files:
        path = Path(item)
        key = next((k for k in (str(item), path.name, os.path.relpath(path, folder)) if k in by_name), None)
        if key is None:
            raise UsageError(f"{item}: not listed in {manifest}; nothing to compare it with")
        jobs.append(_Job(str(item), path, by_name[key].sha256, by_name[key].line))
    return jobs


def _run_jobs(jobs: Sequence[_Job], *, ignore_missing: bool = False, workers: int | None = None,
              progress: bool | None = None) -> list[FileCheck]:
    """Hash every distinct path once, in parallel, and turn each job into its :class:`FileCheck`."""
    paths = list(dict.fromkeys(job.path for job in jobs if job.path is not None))
    total = sum(_size(path) for path in paths)
    count = max(1, min(workers or os.cpu_count() or 1, len(paths) or 1))
    with byte_bar(total, "verify", enabled=progress) as bar:
        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="verify") as pool:
            digests = dict(zip(paths, pool.map(lambda p: _digest(p, bar.update), paths)))
    results = [_result(job, digests.get(job.path) if job.path is not None else None, ignore_missing=ignore_missing)
               for job in jobs]
    for result in results:
        logger.debug("%s: %s %s", result.name, result.status, result.detail)
    return results


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def _digest(path: Path, on_bytes: Callable[[int], None]) -> _Digest:
    if str(path) == "-":
        return _Digest(_stream_digest(sys.stdin.buffer, on_bytes))
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):  # a FIFO or device has no size to plan reads by: stream it
                return _Digest(_stream_digest(handle, on_bytes))
            if info.st_size <= _SMALL_FILE:  # configs, manifests: no read-ahead thread and buffers for these
                data = handle.read()
                on_bytes(len(data))
                pointer = info.st_size < 1024 and data.startswith(LFS_POINTER_PREFIX)
                return _Digest(hashlib.sha256(data).hexdigest(), pointer=pointer)
        actual = sha256_file(path, on_bytes=on_bytes)
    except OSError as exc:
        return _Digest(None, exc.strerror or str(exc), missing=isinstance(exc, FileNotFoundError))
    return _Digest(actual)


def _stream_digest(handle: BinaryIO, on_bytes: Callable[[int], None]) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(IO_CHUNK_BYTES):
        digest.update(chunk)
        on_bytes(len(chunk))
    return digest.hexdigest()


def _result(job: _Job, digest: _Digest | None, *, ignore_missing: bool) -> FileCheck:
    path = str(job.path) if job.path is not None else job.name
    if digest is None:
        status = "SKIPPED" if ignore_missing and job.absent else "MISSING"
        return FileCheck(job.name, path, job.expected, None, status, job.detail, line=job.line)
    if digest.actual is None:
        status = "SKIPPED" if ignore_missing and digest.missing else "MISSING"
        return FileCheck(job.name, path, job.expected, None, status, digest.error or "", line=job.line)
    if job.expected is None:
        return FileCheck(job.name, path, None, digest.actual, "UNVERIFIED", "no expected hash given", line=job.line)
    if digest.actual == job.expected:
        return FileCheck(job.name, path, job.expected, digest.actual, "OK", line=job.line)
    note = "is a Git LFS pointer file, not the data; fetch the real file (git lfs pull)" if digest.pointer else ""
    return FileCheck(job.name, path, job.expected, digest.actual, "FAILED",
                     f"expected {job.expected}, got {digest.actual}", line=job.line, note=note)


def verify_parts(parts: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], *,
                 sha256: str | None = None, manifest: str | os.PathLike[str] | None = None,
                 part_hashes: bool | None = None, progress: bool | None = None) -> FileCheck:
    """Hash the file that ``parts`` would join into, straight from the parts, writing nothing.

    Without an expected hash (``sha256``, ``manifest`` or a ``SHA256SUMS`` beside the parts) the hash is
    reported with status ``UNVERIFIED``. Each part's own hash costs a second hashing pass of CPU, so it
    is computed when the manifest lists part hashes (to name the bad part) or ``part_hashes=True``.
    """
    part_set = resolve_part_set(parts)
    expected = expected_hashes(part_set, expected_sha256=sha256, manifest=manifest)
    if part_set.output_name.endswith(".safetensors"):
        check_parts_structure(part_set, expected, output=part_set.output_name)
    whole = WholeHasher()
    consumers: list[Consumer] = [whole]
    per_part = SegmentHasher(len(part_set.parts)) if (part_hashes or expected.parts) else None
    if per_part is not None:
        consumers.append(per_part)
    segments = [Segment(p, 0, s) for p, s in zip(part_set.parts, part_set.sizes)]
    with byte_bar(part_set.total_size, f"verify {part_set.output_name}", enabled=progress) as bar:
        run_pipeline(segments, [*consumers, CallbackConsumer(bar.update)])
    actual = whole.hexdigest()
    part_digests = dict(zip((p.name for p in part_set.parts), per_part.hexdigests())) if per_part else {}
    bad = [n for n, d in expected.parts.items() if part_digests.get(n) != d]
    if expected.whole is None and not expected.parts:
        return FileCheck(part_set.output_name, str(part_set.folder), None, actual, "UNVERIFIED",
                         "no expected hash given", part_digests)
    ok = not bad and (expected.whole is None or actual == expected.whole)
    detail = "" if ok else (f"part(s) {', '.join(bad)} do not match the manifest" if bad
                            else f"expected {expected.whole}, got {actual}")
    return FileCheck(part_set.output_name, str(part_set.folder), expected.whole, actual, "OK" if ok else "FAILED",
                     detail, part_digests)
