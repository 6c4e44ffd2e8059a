"""The safetensors file format: header parsing with every rule of the reference reader.

Layout: 8 bytes little-endian u64 header length N, N bytes of UTF-8 JSON (starting with ``{``, possibly
padded with spaces), then the byte buffer. Each entry is ``{"dtype", "shape", "data_offsets": [b, e)}``
relative to the buffer; ``__metadata__`` maps str to str. The reference reader (safetensors
``src/tensor.rs``) rejects every case checked here; we report the tensor and the absolute byte offset.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import LfsPointerError, SafetensorsFormatError

#: The reference reader refuses headers longer than this.
MAX_HEADER_BYTES = 100_000_000

#: Bytes per element for every dtype the format defines with a whole-byte size.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

LFS_POINTER_PREFIX = b"version https://git-lfs"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header; offsets are absolute positions in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset of the first byte in the file
    end: int  # absolute offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed and validated safetensors header."""

    source: str
    header_len: int
    file_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start


def check_not_lfs_pointer(first_bytes: bytes, source: str) -> None:
    """Raise :class:`LfsPointerError` when ``first_bytes`` start a Git LFS pointer file."""
    if first_bytes.startswith(LFS_POINTER_PREFIX):
        raise LfsPointerError(
            f"{source}: this is a Git LFS pointer file, not the data; fetch the real file "
            f"(git lfs pull, or gptq-tools download)")


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Raises:
        SafetensorsFormatError: the file breaks a rule of the format (the message names the rule,
            the tensor and the byte offset).
        LfsPointerError: the file is a Git LFS pointer.
        OSError: the file cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        return read_header_from(handle, os.fstat(handle.fileno()).st_size, source=str(path))


def read_header_from(stream: BinaryIO, total_size: int, *, source: str) -> SafetensorsHeader:
    """Validate the safetensors header read from ``stream`` (positioned anywhere; it is seeked to 0).

    ``total_size`` is the full size of the file (or of the virtual file made of parts).
    """
    stream.seek(0)
    head = stream.read(64)
    check_not_lfs_pointer(head, source)
    prefix = head[:8]
    if total_size < 8 or len(prefix) < 8:
        raise SafetensorsFormatError(
            f"{source}: file is {total_size} bytes, too short to be safetensors (needs an 8-byte header "
            f"length); the file is truncated or not safetensors")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise SafetensorsFormatError(
            f"{source}: header length {header_len} bytes is over the limit of {MAX_HEADER_BYTES}; "
            f"the file is corrupt or not safetensors (is this the first part of a split file?)")
    if 8 + header_len > total_size:
        raise SafetensorsFormatError(
            f"{source}: header length {header_len} runs past the end of the {total_size}-byte file; "
            f"the file is truncated or not safetensors")
    stream.seek(8)
    raw = stream.read(header_len)
    if len(raw) != header_len:
        raise SafetensorsFormatError(f"{source}: file ended inside the header (offset {8 + len(raw)})")
    return parse_header_bytes(raw, total_size, source=source)


def parse_header_bytes(raw: bytes, total_size: int, *, source: str) -> SafetensorsHeader:
    """Validate header JSON bytes ``raw`` of a file of ``total_size`` bytes."""
    header_len = len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SafetensorsFormatError(
            f"{source}: header is not valid UTF-8 (byte offset {8 + exc.start}); the file is corrupt") from None
    if not text.startswith("{"):
        raise SafetensorsFormatError(f"{source}: header does not start with '{{' (byte offset 8); not safetensors")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SafetensorsFormatError(
            f"{source}: header is not valid JSON ({exc.msg} at byte offset {8 + exc.pos}); the file is corrupt"
        ) from None
    if not isinstance(document, dict):
        raise SafetensorsFormatError(f"{source}: header JSON is not an object")
    metadata = _parse_metadata(document.pop("__metadata__", None), source)
    data_start = 8 + header_len
    entries = [_parse_entry(name, value, data_start, source) for name, value in document.items()]
    _check_layout(entries, data_start, total_size, source)
    return SafetensorsHeader(source=source, header_len=header_len, file_size=total_size,
                             tensors={entry.name: entry for entry in entries}, metadata=metadata)


def _parse_metadata(value: object, source: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SafetensorsFormatError(f"{source}: __metadata__ must map strings to strings")
    return dict(value)


def _parse_entry(name: str, value: object, data_start: int, source: str) -> TensorEntry:
    where = f"{source}: tensor {name!r}"
    if not isinstance(value, dict):
        raise SafetensorsFormatError(f"{where}: entry is not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise SafetensorsFormatError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape):
        raise SafetensorsFormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise SafetensorsFormatError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if end < begin:
        raise SafetensorsFormatError(f"{where}: data_offsets end {end} is before begin {begin}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if expected >= 2**64:
        raise SafetensorsFormatError(f"{where}: shape {shape} overflows the byte size")
    if end - begin != expected:
        raise SafetensorsFormatError(
            f"{where}: holds {end - begin} bytes at offset {data_start + begin} but dtype {dtype} and shape "
            f"{shape} need {expected}")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=data_start + begin, end=data_start + end)


def _check_layout(entries: list[TensorEntry], data_start: int, total_size: int, source: str) -> None:
    position = data_start
    previous: str | None = None
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin > position:
            after = f"after tensor {previous!r}" if previous else "at the start of the data"
            raise SafetensorsFormatError(
                f"{source}: gap of {entry.begin - position} bytes {after} (offset {position}) before tensor "
                f"{entry.name!r}; the file is corrupt")
        if entry.begin < position:
            raise SafetensorsFormatError(
                f"{source}: tensor {entry.name!r} at offset {entry.begin} overlaps tensor {previous!r} "
                f"(which ends at {position}); the file is corrupt")
        position, previous = entry.end, entry.name
    if position != total_size:
        if position > total_size:
            raise SafetensorsFormatError(
                f"{source}: tensor {previous!r} ends at offset {position} but the file is only {total_size} "
                f"bytes; the file is truncated (a missing or short part?)")
        raise SafetensorsFormatError(
            f"{source}: {total_size - position} trailing bytes after the last tensor (data ends at offset "
            f"{position}, file is {total_size} bytes); the file has extra data appended")


def build_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None,
                 *, align: int = 8) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Lay out a header for tensors given as (name, dtype, shape), in that order.

    Returns the 8-byte length plus JSON header (padded with spaces so the data starts aligned), and
    each tensor's (begin, end) relative to the data buffer.
    """
    document: dict[str, object] = {}
    if metadata:
        document["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        offsets[name] = (position, position + nbytes)
        document[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        position += nbytes
    raw = json.dumps(document, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-(8 + len(raw))) % align)
    return struct.pack("<Q", len(raw)) + raw, offsets
