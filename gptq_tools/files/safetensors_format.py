"""The safetensors file format: header parsing with every rule of the reference reader.

Layout: 8 bytes little-endian u64 header length N, N bytes of UTF-8 JSON (usually padded with spaces),
then the byte buffer. Each entry is ``{"dtype", "shape", "data_offsets": [b, e)}``
relative to the buffer; ``__metadata__`` maps str to str. We accept exactly the files the reference
reader (safetensors 0.8 ``src/tensor.rs`` ``read_metadata``, parsing with serde_json) accepts, which a
differential fuzz test checks, and report the tensor and the absolute byte offset.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import LfsPointerError, NotRegularFileError, SafetensorsFormatError
from .json_strict import JsonObject, JsonRejected, loads_strict

#: The reference reader refuses headers longer than this.
MAX_HEADER_BYTES = 100_000_000

#: Bits per element of every dtype the reference reader knows (``Dtype::bitsize`` in ``tensor.rs``).
DTYPE_BITS: dict[str, int] = {
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}

#: Bytes per element of the dtypes with a whole-byte size (the ones gptq-tools writes).
DTYPE_SIZES: dict[str, int] = {name: bits // 8 for name, bits in DTYPE_BITS.items() if bits % 8 == 0}

_U64_MAX = 2**64 - 1
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")

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
        NotRegularFileError: ``path`` is a FIFO, device, socket or folder (nothing is read from it).
        OSError: the file cannot be read.
    """
    path = Path(path)
    with open_regular_file(path) as handle:
        return read_header_from(handle, os.fstat(handle.fileno()).st_size, source=str(path))


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for binary reading, refusing anything but a regular file.

    A FIFO would block ``open`` (and a device such as ``/dev/zero`` never ends), so the type is checked
    with ``stat`` before opening, and again on the open descriptor (opened non-blocking) in case the
    name was swapped in between.

    Raises:
        NotRegularFileError: ``path`` is a FIFO, device, socket or folder.
        OSError: ``path`` cannot be opened.
    """
    require_regular(os.stat(path).st_mode, path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        require_regular(os.fstat(fd).st_mode, path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def require_regular(mode: int, path: str | os.PathLike[str]) -> None:
    """Refuse a FIFO, device, socket or folder (``mode`` from ``stat``) with one line naming ``path``."""
    if stat.S_ISREG(mode):
        return
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    raise NotRegularFileError(f"{path}: is {kind}, not a regular file; give the path of the file itself")


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
    """Validate header JSON bytes ``raw`` of a file of ``total_size`` bytes.

    Accepts exactly what the reference reader accepts: serde_json's grammar and limits
    (:mod:`gptq_tools.files.json_strict`), serde's rules for the header's types (a duplicate
    ``__metadata__`` or tensor field is refused, a duplicate tensor name keeps its last entry, an entry
    may also be the array ``[dtype, shape, data_offsets]``), then the layout checks of ``Metadata::validate``.
    """
    try:
        document = loads_strict(raw)
    except JsonRejected as exc:
        where = f" at byte offset {8 + exc.offset}" if exc.offset is not None else ""
        raise SafetensorsFormatError(
            f"{source}: header is not valid JSON for safetensors ({exc}{where}); the file is corrupt") from None
    if not isinstance(document, JsonObject):
        raise SafetensorsFormatError(f"{source}: header JSON is not an object; not safetensors")
    metadata: dict[str, str] = {}
    seen_metadata = False
    infos: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, value in document:
        if name == "__metadata__":
            if seen_metadata:
                raise SafetensorsFormatError(f"{source}: header has __metadata__ twice; the file is corrupt")
            seen_metadata = True
            metadata = _parse_metadata(value, source)
        else:
            infos[name] = _parse_entry(name, value, source)  # serde's map: a later duplicate wins
    data_start = 8 + len(raw)
    entries = _check_layout(infos, data_start, total_size, source)
    return SafetensorsHeader(source=source, header_len=len(raw), file_size=total_size,
                             tensors={entry.name: entry for entry in entries}, metadata=metadata)


def _parse_metadata(value: object, source: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, JsonObject) or not all(isinstance(v, str) for _, v in value):
        raise SafetensorsFormatError(f"{source}: __metadata__ must map strings to strings")
    return dict(value)


def _parse_entry(name: str, value: object, source: str) -> tuple[str, tuple[int, ...], int, int]:
    """One tensor's (dtype, shape, begin, end) as serde deserializes ``TensorInfo``."""
    where = f"{source}: tensor {name!r}"
    if isinstance(value, JsonObject):
        fields: dict[str, object] = {}
        for key, item in value:
            if key in _ENTRY_FIELDS:
                if key in fields:
                    raise SafetensorsFormatError(f"{where}: field {key!r} appears twice")
                fields[key] = item
        missing = [key for key in _ENTRY_FIELDS if key not in fields]
        if missing:
            raise SafetensorsFormatError(f"{where}: entry has no {missing[0]!r}")
        dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    elif _is_array(value) and len(value) == 3:
        dtype, shape, offsets = value
    else:
        raise SafetensorsFormatError(f"{where}: entry is not an object with dtype, shape and data_offsets")
    dtype_name = _dtype_name(dtype)
    if dtype_name is None:
        raise SafetensorsFormatError(f"{where}: unknown dtype {_short(dtype)}")
    if not _is_array(shape) or not all(_is_u64(d) for d in shape):
        raise SafetensorsFormatError(f"{where}: shape {_short(shape)} is not a list of non-negative integers")
    if not _is_array(offsets) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise SafetensorsFormatError(
            f"{where}: data_offsets {_short(offsets)} is not a pair of non-negative integers")
    return dtype_name, tuple(shape), offsets[0], offsets[1]


def _dtype_name(value: object) -> str | None:
    """The dtype serde reads from ``value``: a name, or serde's enum form ``{"NAME": null}``."""
    if isinstance(value, JsonObject) and len(value) == 1 and value[0][1] is None:
        value = value[0][0]
    return value if isinstance(value, str) and value in DTYPE_BITS else None


def _is_array(value: object) -> bool:
    return isinstance(value, list) and not isinstance(value, JsonObject)


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value <= _U64_MAX


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_layout(infos: dict[str, tuple[str, tuple[int, ...], int, int]], data_start: int, total_size: int,
                  source: str) -> list[TensorEntry]:
    """``Metadata::validate``: contiguous from 0 in offset order, sizes overflow-checked, ends at the file end."""
    position = 0
    previous: str | None = None
    entries = []
    for name, (dtype, shape, begin, end) in sorted(infos.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin > position:
            after = f"after tensor {previous!r}" if previous else "at the start of the data"
            raise SafetensorsFormatError(
                f"{source}: gap of {begin - position} bytes {after} (offset {data_start + position}) before "
                f"tensor {name!r}; the file is corrupt")
        if begin < position:
            raise SafetensorsFormatError(
                f"{source}: tensor {name!r} at offset {data_start + begin} overlaps tensor {previous!r} "
                f"(which ends at {data_start + position}); the file is corrupt")
        if end < begin:
            raise SafetensorsFormatError(f"{source}: tensor {name!r}: data_offsets end {end} is before begin {begin}")
        expected = _byte_size(name, dtype, shape, source)
        if end - begin != expected:
            raise SafetensorsFormatError(
                f"{source}: tensor {name!r}: holds {end - begin} bytes at offset {data_start + begin} but dtype "
                f"{dtype} and shape {list(shape)} need {expected}")
        entries.append(TensorEntry(name=name, dtype=dtype, shape=shape, begin=data_start + begin,
                                   end=data_start + end))
        position, previous = end, name
    if data_start + position != total_size:
        if data_start + position > total_size:
            raise SafetensorsFormatError(
                f"{source}: tensor {previous!r} ends at offset {data_start + position} but the file is only "
                f"{total_size} bytes; the file is truncated (a missing or short part?)")
        raise SafetensorsFormatError(
            f"{source}: {total_size - data_start - position} trailing bytes after the last tensor (data ends at "
            f"offset {data_start + position}, file is {total_size} bytes); the file has extra data appended")
    return entries


def _byte_size(name: str, dtype: str, shape: tuple[int, ...], source: str) -> int:
    """Bytes of a tensor, overflow-checked step by step in u64 as the reference does."""
    elements = 1
    for dim in shape:
        elements *= dim
        if elements > _U64_MAX:
            raise SafetensorsFormatError(f"{source}: tensor {name!r}: shape {list(shape)} overflows the byte size")
    bits = elements * DTYPE_BITS[dtype]
    if bits > _U64_MAX:
        raise SafetensorsFormatError(f"{source}: tensor {name!r}: shape {list(shape)} overflows the byte size")
    if bits % 8:
        raise SafetensorsFormatError(
            f"{source}: tensor {name!r}: {elements} elements of {dtype} do not end on a byte boundary")
    return bits // 8


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
