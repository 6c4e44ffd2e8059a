"""Verify files against expected SHA256s (``sha256sum -c`` semantics), and parts without joining them.

Several files are hashed in parallel threads (hashlib releases the GIL), each with read-ahead, so
verification runs at the speed of the disk or of the cores, whichever is lower.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UsageError
from .fileio import sha256_file
from .join import expected_hashes, resolve_part_set
from .manifest import is_sha256, read_manifest_entries
from .parts import check_safetensors_parts
from .pipeline import CallbackConsumer, Consumer, Segment, SegmentHasher, WholeHasher, run_pipeline
from .progress import byte_bar
from .safetensors_format import LFS_POINTER_PREFIX

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileCheck:
    """The outcome for one file: ``status`` is ``OK``, ``FAILED`` or ``MISSING`` (could not be read)."""

    name: str
    path: str
    expected: str | None
    actual: str | None
    status: str
    detail: str = ""
    parts: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def verify_files(files: Sequence[str | os.PathLike[str]] = (), *, sha256: str | None = None,
                 manifest: str | os.PathLike[str] | None = None, workers: int | None = None,
                 ignore_missing: bool = False, progress: bool | None = None) -> list[FileCheck]:
    """Hash files and compare them with the expected SHA256s.

    Args:
        files: files to check. With a manifest and no files, every file the manifest names is checked
            (paths relative to the manifest's folder); with files, only those (by name).
        sha256: the expected hash, when checking exactly one file.
        manifest: a sha256sum-format manifest.
        workers: files hashed at once (default: the number of cores, at most the number of files).
        ignore_missing: skip manifest entries whose files do not exist (``sha256sum --ignore-missing``).
        progress: show a progress bar (None: automatic).

    Returns:
        One :class:`FileCheck` per file, in order; ``status`` says OK, FAILED or MISSING.

    Raises:
        UsageError: nothing to check, or no expected hash for a file.
        ManifestError: the manifest does not parse or names unsafe paths.
    """
    jobs = _jobs(files, sha256, manifest)
    if ignore_missing:
        jobs = [job for job in jobs if job[1].exists()]
        if not jobs:
            raise UsageError(f"{manifest}: none of the files it lists is present")
    total = sum(os.path.getsize(path) for _, path, _ in jobs if path.is_file())
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with byte_bar(total, "verify", enabled=progress) as bar:
        def check(job: tuple[str, Path, str]) -> FileCheck:
            return _check_one(*job, on_bytes=bar.update)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
            results = list(pool.map(check, jobs))
    for result in results:
        log = logger.info if result.ok else logger.error
        log("%s: %s %s", result.name, result.status, result.detail)
    return results


def _jobs(files: Sequence[str | os.PathLike[str]], sha256: str | None,
          manifest: str | os.PathLike[str] | None) -> list[tuple[str, Path, str]]:
    if sha256 is not None:
        if not is_sha256(sha256.strip()):
            raise UsageError(f"--sha256 {sha256!r} is not a SHA256 (64 hex digits)")
        if len(files) != 1:
            raise UsageError("--sha256 checks exactly one file; use a manifest for several")
        return [(str(files[0]), Path(files[0]), sha256.strip().lower())]
    if manifest is None:
        raise UsageError("nothing to verify against: pass --sha256 HEX or a manifest (-c SHA256SUMS)")
    folder = Path(manifest).parent
    entries = read_manifest_entries(manifest)
    if not files:
        return [(e.name, folder / e.name, e.sha256) for e in entries]
    by_name = {e.name: e.sha256 for e in entries}
    jobs = []
    for item in files:
        path = Path(item)
        key = next((k for k in (str(item), path.name, os.path.relpath(path, folder)) if k in by_name), None)
        if key is None:
            raise UsageError(f"{item}: not listed in {manifest}; nothing to compare it with")
        jobs.append((str(item), path, by_name[key]))
    return jobs


def _check_one(name: str, path: Path, expected: str, *, on_bytes: object) -> FileCheck:
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(LFS_POINTER_PREFIX))
        if head == LFS_POINTER_PREFIX and path.stat().st_size < 1024:
            return FileCheck(name, str(path), expected, None, "FAILED",
                             "is a Git LFS pointer file, not the data; fetch the real file")
        actual = sha256_file(path, on_bytes=on_bytes)  # type: ignore[arg-type]
    except OSError as exc:
        return FileCheck(name, str(path), expected, None, "MISSING", f"cannot read: {exc.strerror or exc}")
    status = "OK" if actual == expected else "FAILED"
    detail = "" if status == "OK" else f"expected {expected}, got {actual}"
    return FileCheck(name, str(path), expected, actual, status, detail)


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
        check_safetensors_parts(part_set)
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
