"""Split a file into byte parts for publishing, and reshard a safetensors file into valid shards.

``split_file`` writes parts named like the seed repositories' (``NAME.JOINBEFOREUSE.split-a.EXT``) and a
``SHA256SUMS`` holding the whole file's hash and every part's, in one read of the source.
``reshard_file`` rewrites one big safetensors file as shards that are each a valid safetensors file,
plus ``model.safetensors.index.json`` (what transformers and vLLM load), verified against the source.
"""

from __future__ import annotations

import contextlib
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

from .errors import ChecksumMismatchError, OutputExistsError, UsageError
from .fileio import (
    TEMP_PREFIX,
    atomic_path,
    check_free_space,
    fsync_dir,
    raise_if_no_space,
    sha256_file,
    write_bytes_atomic,
)
from .manifest import write_manifest
from .paths import require_file
from .pipeline import CallbackConsumer, Consumer, PwriteConsumer, Segment, SegmentHasher, WholeHasher, run_pipeline
from .progress import byte_bar
from .safetensors_format import build_header, read_header
from .units import parse_size

logger = logging.getLogger(__name__)

MANIFEST_NAME = "SHA256SUMS"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class SplitResult:
    parts: tuple[Path, ...]
    sha256: str
    part_sha256: dict[str, str]
    manifest: Path


@dataclass(frozen=True)
class ReshardResult:
    shards: tuple[Path, ...]
    index: Path
    manifest: Path
    total_size: int


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

    Raises:
        PathNotFoundError, NotAFileError: ``path`` is missing or a folder.
        UsageError: the file already fits in one part; OutputExistsError: a part exists (without ``force``);
        InsufficientSpaceError: not enough free space for the parts.
    """
    source = require_file(path, what="the file to split")
    limit = parse_size(max_size, what="--max-size")
    size = source.stat().st_size
    if limit <= 0:
        raise UsageError("--max-size must be positive")
    if size <= limit:
        raise UsageError(f"{source}: {size} bytes already fits in one part of --max-size {limit}; nothing to split")
    folder = Path(output_dir) if output_dir else source.parent
    folder.mkdir(parents=True, exist_ok=True)
    count = math.ceil(size / limit)
    finals = [folder / name for name in part_names(source.name, count)]
    for final in finals:
        if final.exists() and not force:
            raise OutputExistsError(f"{final}: part already exists; pass --force to overwrite it")
    check_free_space(folder, size, what=f"splitting {source.name}")
    segments = [Segment(source, i * limit, min(limit, size - i * limit)) for i in range(count)]
    with contextlib.ExitStack() as stack:  # every part is renamed into place only if all were written
        temps = [stack.enter_context(atomic_path(final, force=force)) for final in finals]
        fds = [os.open(t, os.O_WRONLY) for t in temps]
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
    manifest = folder / MANIFEST_NAME
    write_manifest(manifest, {source.name: whole.hexdigest(), **digests})
    logger.info("%s: split into %d parts; SHA256 %s written to %s", source, count, whole.hexdigest(), manifest)
    return SplitResult(tuple(finals), whole.hexdigest(), digests, manifest)


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
    the source. Everything is built in a temporary folder and moved into place at the end, the index last.

    Raises:
        PathNotFoundError, NotAFileError: ``path`` is missing or a folder.
        OutputExistsError: the output folder holds an index or shards (without ``force``).
        ChecksumMismatchError: a shard read back differs from what the source holds.
    """
    source = require_file(path, what="the safetensors file to reshard")
    limit = parse_size(max_shard_size, what="--max-shard-size")
    header = read_header(source)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_NAME).exists() and not force:
        raise OutputExistsError(f"{out / INDEX_NAME}: already exists; pass --force to overwrite the shards")
    check_free_space(out, header.file_size, what=f"resharding {source.name}")
    ordered = sorted(header.tensors.values(), key=lambda e: e.begin)
    plan = plan_shards([(e.name, e.nbytes) for e in ordered], limit)
    names = shard_names(len(plan))
    metadata = {"format": "pt", **header.metadata}
    work = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}reshard.{os.getpid()}.", dir=out))
    try:
        prefixes, segments = [], []
        for tensor_names in plan:
            entries = [header.tensors[n] for n in tensor_names]
            blob, _ = build_header([(e.name, e.dtype, e.shape) for e in entries], metadata)
            prefixes.append(blob)
            begin = entries[0].begin if entries else header.data_start
            segments.append(Segment(source, begin, sum(e.nbytes for e in entries)))
        digests = _write_shards(work, names, prefixes, segments, progress)
        _verify_shards(work, names, digests, plan)
        weight_map = {tensor: name for name, tensors in zip(names, plan) for tensor in tensors}
        index = {"metadata": {"total_size": sum(s.length for s in segments)}, "weight_map": weight_map}
        for name in names:
            os.replace(work / name, out / name)
        write_bytes_atomic(out / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
        fsync_dir(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest = out / MANIFEST_NAME
    write_manifest(manifest, dict(zip(names, digests)))
    logger.info("%s: resharded into %d file(s) in %s, verified against the source", source, len(names), out)
    return ReshardResult(tuple(out / n for n in names), out / INDEX_NAME, manifest, header.file_size)


def _write_shards(work: Path, names: list[str], prefixes: list[bytes], segments: list[Segment],
                  progress: bool | None) -> list[str]:
    targets = [work / name for name in names]
    fds = [os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644) for t in targets]
    try:
        for fd, prefix, target in zip(fds, prefixes, targets):
            try:
                os.write(fd, prefix)
            except OSError as exc:
                raise_if_no_space(exc, target)
                raise
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
