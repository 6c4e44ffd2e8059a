"""Split a file into byte parts for publishing, and reshard a safetensors file into valid shards.

``split_file`` writes parts named like the seed repositories' (``NAME.JOINBEFOREUSE.split-a.EXT``) and a
``SHA256SUMS`` holding the whole file's hash and every part's, in one read of the source.
``reshard_file`` rewrites one big safetensors file as shards that are each a valid safetensors file,
plus ``model.safetensors.index.json`` (what transformers and vLLM load), verified against the source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import string
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ChecksumMismatchError, OutputExistsError, PathNotFoundError, UsageError
from ..progress import byte_bar
from ..units import parse_size
from .fileio import (
    TEMP_PREFIX,
    atomic_path,
    check_free_space,
    fsync_dir,
    open_nofollow,
    raise_if_no_space,
    raise_if_not_writable,
    remove_stale_temp_dirs,
    remove_stale_temps,
    replace,
    rmtree,
    write_all,
)
from .manifest import format_manifest_line, parse_manifest, write_manifest
from .paths import require_file
from .pipeline import (
    CallbackConsumer,
    Consumer,
    PwriteConsumer,
    Segment,
    SegmentHasher,
    WholeHasher,
    run_pipeline,
    sha256_file,
)
from .safetensors_format import SafetensorsHeader, build_header, read_header, require_regular

logger = logging.getLogger(__name__)

MANIFEST_NAME = "SHA256SUMS"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class SplitResult:
    parts: tuple[Path, ...]
    sha256: str
    part_sha256: dict[str, str]
    manifest: Path
    already_done: bool = False  # every part was already there with the right bytes (a rerun)


@dataclass(frozen=True)
class ReshardResult:
    shards: tuple[Path, ...]
    index: Path
    manifest: Path
    total_size: int
    already_done: bool = False  # every shard and the index were already there with the right bytes


def part_names(filename: str, count: int) -> list[str]:
    """``NAME.JOINBEFOREUSE.split-a.EXT`` ... for ``count`` parts (two letters past 26 parts)."""
    stem, dot, ext = filename.rpartition(".")
    stem, ext = (stem, "." + ext) if dot and stem else (filename, "")
    width = 1
    while 26**width < count:
        width += 1
    names = []
    for index in range(count):
        letters, value = [], index
        for _ in range(width):
            value, rest = divmod(value, 26)
            letters.append(string.ascii_lowercase[rest])
        names.append(f"{stem}.JOINBEFOREUSE.split-{''.join(reversed(letters))}{ext}")
    return names


def split_file(path: str | os.PathLike[str], *, max_size: int | str,
               output_dir: str | os.PathLike[str] | None = None,
               force: bool = False, progress: bool | None = None) -> SplitResult:
    """Split ``path`` into parts of at most ``max_size`` bytes plus a ``SHA256SUMS`` manifest.

    The parts and the manifest are all written as temporaries first and renamed into place at the end,
    the manifest last. A part that already exists with exactly the bytes it would get is no conflict
    (it is what an interrupted run published): a rerun finishes the job, or says it is done.

    Raises:
        PathNotFoundError, NotAFileError: ``path`` is missing or a folder; UsageError: it is not a regular
        file, or already fits in one part; OutputExistsError: a part exists with other content (without ``force``);
        InsufficientSpaceError: not enough free space for the parts, or the disk filled up.
    """
    source = require_file(path, what="the file to split")
    limit = parse_size(max_size, what="--max-size")
    size = _input_size(source)
    if limit <= 0:
        raise UsageError("--max-size must be positive")
    if size <= limit:
        raise UsageError(f"{source}: {size} bytes already fits in one part of --max-size {limit}; nothing to split")
    folder = Path(output_dir) if output_dir else source.parent
    count = math.ceil(size / limit)
    check_part_count(count, what=f"{source}: splitting {size} bytes at --max-size {limit}", force=force)
    finals = [folder / name for name in part_names(source.name, count)]
    manifest = folder / MANIFEST_NAME
    _make_folder(folder, finals[0])
    segments = [Segment(source, i * limit, min(limit, size - i * limit)) for i in range(count)]
    if not force and any(final.exists() for final in finals):
        done = _finished_split(source, segments, finals, manifest, progress)
        if done is not None:
            return done
    check_free_space(folder, size, what=f"splitting {source.name}")
    with contextlib.ExitStack() as stack:  # renamed into place only if all were written; the manifest last
        manifest_temp = stack.enter_context(atomic_path(manifest, force=True))
        temps = [stack.enter_context(atomic_path(final, force=True)) for final in finals]
        fds = [open_nofollow(t, os.O_WRONLY) for t in temps]
        try:
            whole, per_part = WholeHasher(), SegmentHasher(count)
            with byte_bar(size, f"split {source.name}", enabled=progress) as bar:
                writer = PwriteConsumer(fds, [0] * count, finals)  # errors name the part, not its temporary
                run_pipeline(segments, [whole, per_part, writer, CallbackConsumer(bar.update)])
            for fd, final in zip(fds, finals):
                _fsync(fd, final)
        finally:
            for fd in fds:
                os.close(fd)
        digests = dict(zip((f.name for f in finals), per_part.hexdigests()))
        write_file_durably(manifest_temp, manifest_bytes(manifest, {source.name: whole.hexdigest(), **digests}),
                           manifest)
    logger.info("%s: split into %d parts; SHA256 %s written to %s", source, count, whole.hexdigest(), manifest)
    return SplitResult(tuple(finals), whole.hexdigest(), digests, manifest)


#: More parts than this is almost surely a unit mistake (a bare number is bytes): refused without --force.
MAX_PARTS = 10_000


def check_part_count(count: int, *, what: str, force: bool, open_at_once: bool = False) -> None:
    """Refuse an absurd number of parts before any is created.

    Raises:
        UsageError: more than :data:`MAX_PARTS` without ``force``; or, when every part is open at once
            (reshard), more than the open-file limit allows (forcing cannot help there).
    """
    if open_at_once:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        room = soft - 64 if soft != resource.RLIM_INFINITY else count
        if count > room:
            raise UsageError(f"{what} gives {count} shards, but this process may open only {soft} files and "
                             f"every shard is written at once; use a larger size (e.g. 5GB), or raise the limit "
                             f"(ulimit -n)")
    if count > MAX_PARTS and not force:
        raise UsageError(f"{what} gives {count} parts (more than {MAX_PARTS}); a bare number is bytes, so "
                         f"write the size with a unit (e.g. 45GiB), or pass --force if you mean it")


def _make_folder(folder: Path, target: Path) -> None:
    """Create the output folder; a read-only or forbidden place is one error naming ``target``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise_if_not_writable(exc, target)
        raise


def _input_size(source: Path) -> int:
    """The size of the input file ``source``, refusing a missing file or something that is not a file."""
    try:
        info = source.stat()
    except FileNotFoundError:
        raise PathNotFoundError(f"{source}: no such file; check the path") from None
    require_regular(info.st_mode, source)
    return info.st_size


def _finished_split(source: Path, segments: list[Segment], finals: list[Path], manifest: Path,
                    progress: bool | None) -> SplitResult | None:
    """Compare existing parts with what they would hold: a part with other bytes is refused; when every
    part is already there and right (a rerun, or a run killed before its manifest), make sure the manifest
    lists them and return the result; else None (the split must be written)."""
    whole, per_part = WholeHasher(), SegmentHasher(len(segments))
    with byte_bar(sum(s.length for s in segments), f"check {source.name}", enabled=progress) as bar:
        run_pipeline(segments, [whole, per_part, CallbackConsumer(bar.update)])
    digests = dict(zip((f.name for f in finals), per_part.hexdigests()))
    for final, segment in zip(finals, segments):
        if final.exists() and (final.stat().st_size != segment.length or sha256_file(final) != digests[final.name]):
            raise OutputExistsError(f"{final}: part already exists with other content; pass --force to overwrite "
                                    f"it or choose another folder (-o)")
    if not all(final.exists() for final in finals):
        return None
    for final in finals:
        remove_stale_temps(final)
    entries = {source.name: whole.hexdigest(), **digests}
    listed = parse_manifest(manifest) if manifest.is_file() else {}
    if any(listed.get(name) != digest for name, digest in entries.items()):
        write_manifest(manifest, entries)
    logger.info("%s: already split and verified (%d parts, SHA256 %s, %s)", source, len(finals), whole.hexdigest(),
                manifest)
    return SplitResult(tuple(finals), whole.hexdigest(), digests, manifest, already_done=True)


def manifest_bytes(manifest: Path, entries: dict[str, str]) -> bytes:
    """The text of ``manifest`` with ``entries`` added (entries already in it are kept unless replaced)."""
    combined = parse_manifest(manifest) if manifest.is_file() else {}
    combined.update(entries)
    return "".join(format_manifest_line(name, digest) + "\n" for name, digest in combined.items()).encode("utf-8")


def write_file_durably(temp: Path, data: bytes, final: Path) -> None:
    """Write and fsync ``data`` into ``temp`` (about to become ``final``); a full disk names ``final``."""
    try:
        with open(open_nofollow(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise_if_no_space(exc, final)
        raise


def _fsync(fd: int, target: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise_if_no_space(exc, target)
        raise


def plan_shards(tensors: Sequence[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Group ``(name, nbytes)`` pairs, in order, into shards of at most ``max_shard_size`` tensor bytes;
    a tensor larger than the limit gets a shard of its own (the rule transformers uses)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in tensors:
        if shards[-1] and used + nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_names(count: int, prefix: str = "model") -> list[str]:
    """``model-00001-of-00003.safetensors`` ... as transformers names them."""
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class _PrefixedHasher(Consumer):
    """SHA256 of each output shard: its header bytes followed by the tensor bytes streamed from the source."""

    def __init__(self, prefixes: list[bytes]) -> None:
        self.digests = [hashlib.sha256(prefix) for prefix in prefixes]

    def consume(self, segment_index: int, position: int, data: memoryview) -> None:
        self.digests[segment_index].update(data)


def reshard_file(path: str | os.PathLike[str], output_dir: str | os.PathLike[str], *,
                 max_shard_size: int | str = "5GB", force: bool = False,
                 progress: bool | None = None) -> ReshardResult:
    """Rewrite one safetensors file as shards ``model-0000i-of-0000N.safetensors`` with an index.

    Each shard is a valid safetensors file (same dtypes, shapes, bytes and ``__metadata__``); after
    writing, every shard is read back and its SHA256 compared with the hash of the bytes taken from
    the source. Everything (shards, index, ``SHA256SUMS``) is built in a temporary folder and moved into
    place at the end, the index last, so even with ``force`` a source that is one of the outputs is read
    completely before it is replaced. A shard or index that already exists with exactly the bytes it
    would get is no conflict (a rerun finishes the job, or says it is done).

    Raises:
        PathNotFoundError, NotAFileError: ``path`` is missing or a folder.
        OutputExistsError: a shard or the index exists with other content, or is the source (without ``force``).
        ChecksumMismatchError: a shard read back differs from what the source holds.
        InsufficientSpaceError: not enough free space, or the disk filled up (nothing is published then).
    """
    source = require_file(path, what="the safetensors file to reshard")
    limit = parse_size(max_shard_size, what="--max-shard-size")
    _input_size(source)
    out = Path(output_dir)
    layout = _reshard_layout(source, limit, force=force)
    _make_folder(out, out / INDEX_NAME)
    remove_stale_temp_dirs(out, "reshard")
    header, plan, names, prefixes, segments, index_bytes = (layout.header, layout.plan, layout.names,
                                                            layout.prefixes, layout.segments, layout.index_bytes)
    result = ReshardResult(tuple(out / n for n in names), out / INDEX_NAME, out / MANIFEST_NAME, header.file_size)
    if not force:
        _check_not_the_source(source, [*result.shards, result.index])
        if any(target.exists() for target in [*result.shards, result.index]):
            digests = _planned_digests(prefixes, segments, progress)
            if _finished_reshard(result, digests, index_bytes):
                logger.info("%s: already resharded into %d file(s) in %s and verified", source, len(names), out)
                return dataclasses.replace(result, already_done=True)
    check_free_space(out, header.file_size, what=f"resharding {source.name}")
    try:
        work = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}reshard.{os.getpid()}.", dir=out))
    except OSError as exc:
        raise_if_not_writable(exc, result.index)
        raise
    try:
        digests = _write_shards(work, names, prefixes, segments, progress)
        _verify_shards(work, names, digests, plan)
        write_file_durably(work / INDEX_NAME, index_bytes, result.index)
        write_file_durably(work / MANIFEST_NAME, manifest_bytes(result.manifest, dict(zip(names, digests))),
                           result.manifest)
        for name in names:
            replace(work / name, out / name)
        replace(work / MANIFEST_NAME, result.manifest)
        replace(work / INDEX_NAME, result.index)
        fsync_dir(out)
        rmtree(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("%s: resharded into %d file(s) in %s, verified against the source", source, len(names), out)
    return result


@dataclass(frozen=True)
class _ReshardLayout:
    """What resharding a file gives: which tensors go where, each shard's header, and the index."""

    header: SafetensorsHeader
    plan: list[list[str]]
    names: list[str]
    prefixes: list[bytes]
    segments: list[Segment]
    index_bytes: bytes


def _reshard_layout(source: Path, limit: int, *, force: bool) -> _ReshardLayout:
    header = read_header(source)
    ordered = sorted(header.tensors.values(), key=lambda e: e.begin)
    plan = plan_shards([(e.name, e.nbytes) for e in ordered], limit)
    check_part_count(len(plan), what=f"{source}: resharding at --max-shard-size {limit}", force=force,
                     open_at_once=True)
    names = shard_names(len(plan))
    metadata = {"format": "pt", **header.metadata}
    prefixes, segments = [], []
    for tensor_names in plan:
        entries = [header.tensors[n] for n in tensor_names]
        blob, _ = build_header([(e.name, e.dtype, e.shape) for e in entries], metadata)
        prefixes.append(blob)
        begin = entries[0].begin if entries else header.data_start
        segments.append(Segment(source, begin, sum(e.nbytes for e in entries)))
    weight_map = {tensor: name for name, tensors in zip(names, plan) for tensor in tensors}
    index = {"metadata": {"total_size": sum(s.length for s in segments)}, "weight_map": weight_map}
    return _ReshardLayout(header, plan, names, prefixes, segments, (json.dumps(index, indent=2) + "\n").encode())


@dataclass(frozen=True)
class PlannedOutput:
    """A file a split or reshard would write: its name, size and SHA256 (computed without writing it)."""

    name: str
    size: int
    sha256: str


def plan_split(path: str | os.PathLike[str], *, max_size: int,
               progress: bool | None = None) -> tuple[list[PlannedOutput], str]:
    """The parts :func:`split_file` would write for ``path`` at ``max_size``, and the whole file's SHA256,
    from one read of the file and nothing written.

    Raises:
        UsageError: ``max_size`` is not positive, or the file already fits in one part.
    """
    source = require_file(path, what="the file to split")
    size = _input_size(source)
    if max_size <= 0 or size <= max_size:
        raise UsageError(f"{source}: {size} bytes at a part size of {max_size}: nothing to split")
    count = math.ceil(size / max_size)
    check_part_count(count, what=f"{source}: splitting {size} bytes at {max_size}", force=False)
    segments = [Segment(source, i * max_size, min(max_size, size - i * max_size)) for i in range(count)]
    whole, per_part = WholeHasher(), SegmentHasher(count)
    with byte_bar(size, f"hash {source.name}", enabled=progress) as bar:
        run_pipeline(segments, [whole, per_part, CallbackConsumer(bar.update)])
    outputs = [PlannedOutput(name, segment.length, digest)
               for name, segment, digest in zip(part_names(source.name, count), segments, per_part.hexdigests())]
    return outputs, whole.hexdigest()


def plan_reshard(path: str | os.PathLike[str], *, max_shard_size: int,
                 progress: bool | None = None) -> tuple[list[PlannedOutput], bytes]:
    """The shards :func:`reshard_file` would write for ``path`` (sizes and SHA256 from one read of the
    tensors, nothing written) and the bytes of its index."""
    source = require_file(path, what="the safetensors file to reshard")
    layout = _reshard_layout(source, max_shard_size, force=False)
    digests = _planned_digests(layout.prefixes, layout.segments, progress)
    outputs = [PlannedOutput(name, len(prefix) + segment.length, digest)
               for name, prefix, segment, digest in zip(layout.names, layout.prefixes, layout.segments, digests)]
    return outputs, layout.index_bytes


def largest_shard_overhead(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(the largest tensor's bytes, an upper bound on a shard header's bytes) of safetensors file ``path``:
    a shard is at most its tensors plus that header, so resharding under a file-size cap can be checked
    before anything is written. A shard's header lists a subset of the file's tensors, so the file's own
    header length (plus the ``format`` metadata a shard adds, and padding) bounds it."""
    header = read_header(require_file(path, what="the safetensors file to reshard"))
    largest = max((entry.nbytes for entry in header.tensors.values()), default=0)
    return largest, header.data_start + 64


def _check_not_the_source(source: Path, targets: list[Path]) -> None:
    for target in targets:
        if target.exists() and os.path.samefile(target, source):
            raise OutputExistsError(f"{target}: is the source being resharded; choose another folder (-o), or "
                                    f"pass --force to replace it (the source is read completely first)")


def _planned_digests(prefixes: list[bytes], segments: list[Segment], progress: bool | None) -> list[str]:
    """SHA256 of each shard as it would be written (header bytes, then its tensor bytes from the source)."""
    hasher = _PrefixedHasher(prefixes)
    with byte_bar(sum(s.length for s in segments), "check shards", enabled=progress) as bar:
        run_pipeline(segments, [hasher, CallbackConsumer(bar.update)])
    return [d.hexdigest() for d in hasher.digests]


def _finished_reshard(result: ReshardResult, digests: list[str], index_bytes: bytes) -> bool:
    """Whether every shard and the index already hold the right bytes (then ``SHA256SUMS`` is brought up
    to date). An existing one with other bytes is refused; a missing one means the job is not done.

    Raises:
        OutputExistsError: a shard or the index exists with other content.
    """
    complete = True
    for shard, digest in zip(result.shards, digests):
        if not shard.exists():
            complete = False
        elif sha256_file(shard) != digest:
            raise OutputExistsError(f"{shard}: already exists with other content; pass --force to overwrite it or "
                                    f"choose another folder (-o)")
    if not result.index.exists():
        return False
    if result.index.read_bytes() != index_bytes:
        raise OutputExistsError(f"{result.index}: already exists with other content; pass --force to overwrite it "
                                f"or choose another folder (-o)")
    if not complete:
        return False
    for shard in result.shards:
        remove_stale_temps(shard)
    entries = {shard.name: digest for shard, digest in zip(result.shards, digests)}
    listed = parse_manifest(result.manifest) if result.manifest.is_file() else {}
    if any(listed.get(name) != digest for name, digest in entries.items()):
        write_manifest(result.manifest, entries)
    return True


def _write_shards(work: Path, names: list[str], prefixes: list[bytes], segments: list[Segment],
                  progress: bool | None) -> list[str]:
    targets = [work / name for name in names]
    fds = [os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666) for t in targets]  # the umask applies
    try:
        for fd, prefix, target in zip(fds, prefixes, targets):
            write_all(fd, prefix, target=target)  # a short write raises instead of leaving a hole
        hasher = _PrefixedHasher(prefixes)
        writer = PwriteConsumer(fds, [len(p) for p in prefixes], targets)
        total = sum(s.length for s in segments)
        with byte_bar(total, "reshard", enabled=progress) as bar:
            run_pipeline(segments, [hasher, writer, CallbackConsumer(bar.update)])
        for fd, target in zip(fds, targets):
            _fsync(fd, target)
    finally:
        for fd in fds:
            os.close(fd)
    return [d.hexdigest() for d in hasher.digests]


def _verify_shards(work: Path, names: list[str], digests: list[str], plan: list[list[str]]) -> None:
    for name, expected, tensors in zip(names, digests, plan):
        shard = work / name
        header = read_header(shard)
        if list(header.tensors) != tensors and sorted(header.tensors) != sorted(tensors):
            raise ChecksumMismatchError(f"{name}: shard header lists other tensors than planned")
        actual = sha256_file(shard)
        if actual != expected:
            raise ChecksumMismatchError(f"{name}: shard read back does not match the source (expected {expected}, "
                                        f"got {actual}); the disk may be failing")
