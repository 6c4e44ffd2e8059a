"""Byte-split part sets: finding, ordering and checking them, and reading them as one virtual file.

Recognised names (``EXT`` optional, e.g. ``.safetensors``):
- ``NAME[.JOINBEFOREUSE].split-a[.EXT]``, ``-b``, ... ``-z``, ``-aa`` ...: unix ``split`` letter suffixes,
  all of one width, or GNU split's auto-widening sequence (``aa``..``yz``, ``zaaa``...).
- ``NAME.001``, ``NAME.002`` ... (numbered from 0 or 1) and ``NAME.part1of3[.EXT]`` / ``NAME.part1[.EXT]``.
The joined file is ``NAME.EXT`` (or ``NAME``). A gap, a duplicate index, a stray member of the set or
more than one set in a folder is an error naming the parts concerned.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

from ..errors import PartSetError, SafetensorsFormatError
from .safetensors_format import LFS_POINTER_PREFIX

_LETTER_RE = re.compile(
    r"^(?P<base>.+?)[._-](?P<marker>JOINBEFOREUSE[._-])?split[._-]?(?P<suffix>[a-z]+)(?P<ext>\.[A-Za-z0-9_]+)?$")
_PARTOF_RE = re.compile(r"^(?P<base>.+?)[._-]part(?P<num>\d+)(?:of(?P<total>\d+))?(?P<ext>\.[A-Za-z][A-Za-z0-9_]*)?$",
                        re.IGNORECASE)
_NUMERIC_RE = re.compile(r"^(?P<base>.+)\.(?P<num>\d{3,})$")


@dataclass(frozen=True)
class _PartName:
    scheme: str  # "letters", "partof" or "numeric"
    output_name: str
    key: str  # the index text (suffix letters or digits)
    total: int | None = None


@dataclass(frozen=True)
class PartSet:
    """An ordered, complete set of byte parts that concatenate to ``output_name``."""

    output_name: str
    parts: tuple[Path, ...]
    total_size: int

    @property
    def folder(self) -> Path:
        return self.parts[0].parent

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(os.path.getsize(p) for p in self.parts)


def parse_part_name(filename: str) -> _PartName | None:
    """Classify ``filename`` as a member of a part set, or None when it is not a part name."""
    match = _LETTER_RE.match(filename)
    if match:
        return _PartName("letters", match["base"] + (match["ext"] or ""), match["suffix"])
    match = _PARTOF_RE.match(filename)
    if match:
        total = int(match["total"]) if match["total"] else None
        return _PartName("partof", match["base"] + (match["ext"] or ""), match["num"], total)
    match = _NUMERIC_RE.match(filename)
    if match:
        return _PartName("numeric", match["base"], match["num"])
    return None


def _gnu_suffixes(width: int = 2) -> itertools.chain[str]:
    """GNU split's auto-widening suffix sequence: aa..yz, zaaa..zyzz, zzaaaa..."""
    def generate() -> itertools.chain[str]:
        prefix = ""
        size = width
        while True:
            for combo in itertools.product(string.ascii_lowercase, repeat=size):
                if combo[0] == "z":
                    break
                yield prefix + "".join(combo)
            prefix += "z"
            size += 1
    return generate()  # type: ignore[return-value]


def _letter_index(suffixes: list[str]) -> dict[str, int]:
    widths = {len(s) for s in suffixes}
    if len(widths) == 1:
        return {s: sum((ord(c) - 97) * 26**i for i, c in enumerate(reversed(s))) for s in suffixes}
    wanted, index = set(suffixes), {}
    for position, suffix in enumerate(_gnu_suffixes(min(widths))):
        if suffix in wanted:
            index[suffix] = position
            if len(index) == len(wanted):
                return index
        if position > 26**4:
            break
    odd = sorted(wanted - set(index), key=len)
    raise PartSetError(f"part suffixes {', '.join(sorted(suffixes))} mix widths that no split naming produces; "
                       f"stray part(s): {', '.join(odd) or sorted(suffixes)[-1]}")


def _order(names: dict[str, _PartName], folder: Path, output_name: str) -> list[str]:
    """File names of one set in join order; raises on gaps, duplicates and strays."""
    scheme = next(iter(names.values())).scheme
    if scheme == "letters":
        index = _letter_index([p.key for p in names.values()])
        positions = {name: index[p.key] for name, p in names.items()}
    else:
        positions = {name: int(p.key) for name, p in names.items()}
    by_position: dict[int, list[str]] = {}
    for name, position in positions.items():
        by_position.setdefault(position, []).append(name)
    duplicates = [sorted(group) for group in by_position.values() if len(group) > 1]
    if duplicates:
        raise PartSetError(f"{folder}: duplicate parts for {output_name}: {' and '.join(duplicates[0])} have the "
                           f"same position; remove the wrong one")
    first = 0 if scheme == "letters" or 0 in by_position else 1
    last = max(by_position)
    totals = {p.total for p in names.values() if p.total is not None}
    if len(totals) > 1:
        raise PartSetError(f"{folder}: parts of {output_name} disagree on the part count ({sorted(totals)})")
    if totals:
        last = max(last, totals.pop())
    missing = [position for position in range(first, last + 1) if position not in by_position]
    if missing:
        raise PartSetError(f"{folder}: part set {output_name} is missing part(s) "
                           f"{', '.join(_describe_position(scheme, names, m) for m in missing)}; download them "
                           f"and try again")
    if min(by_position) < first:
        raise PartSetError(f"{folder}: unexpected part {by_position[min(by_position)][0]} before the first part")
    return [by_position[position][0] for position in sorted(by_position)]


def _describe_position(scheme: str, names: dict[str, _PartName], position: int) -> str:
    if scheme == "letters":
        width = len(next(iter(names.values())).key)
        digits = []
        for _ in range(width):
            position, rest = divmod(position, 26)
            digits.append(chr(97 + rest))
        return f"'{''.join(reversed(digits))}'"
    width = len(next(iter(names.values())).key)
    return f"'{position:0{width}d}'"


def find_part_set(path: str | os.PathLike[str]) -> PartSet:
    """Find the part set that ``path`` (a folder, or any part of the set) belongs to.

    Raises:
        PartSetError: no set, several sets in the folder, or a set with a gap, duplicate or stray.
    """
    path = Path(path)
    if path.is_dir():
        folder, wanted = path, None
    else:
        if not path.exists():
            raise PartSetError(f"{path}: no such file; give a folder or one of the parts")
        parsed = parse_part_name(path.name)
        if parsed is None:
            raise PartSetError(f"{path}: not a split part name (expected e.g. NAME.split-a.safetensors or NAME.001)")
        folder, wanted = path.parent, (parsed.output_name, parsed.scheme)
    groups: dict[tuple[str, str], dict[str, _PartName]] = {}
    for entry in sorted(os.listdir(folder)):
        parsed = parse_part_name(entry)
        if parsed is not None and (folder / entry).is_file():
            groups.setdefault((parsed.output_name, parsed.scheme), {})[entry] = parsed
    if wanted is None:
        if not groups:
            raise PartSetError(f"{folder}: no split parts found (expected names like NAME.split-a.safetensors)")
        if len(groups) > 1:
            listing = "; ".join(f"{name} ({len(g)} parts)" for (name, _), g in sorted(groups.items()))
            raise PartSetError(f"{folder}: several part sets found ({listing}); name the parts or one of them")
        wanted = next(iter(groups))
    others = [key for key in groups if key[0] == wanted[0] and key != wanted]
    if others:
        stray = sorted(groups[others[0]])[0]
        raise PartSetError(f"{folder}: {stray} looks like a part of {wanted[0]} but is named differently from "
                           f"{sorted(groups[wanted])[0]}; remove or rename the stray file")
    ordered = _order(groups[wanted], folder, wanted[0])
    return part_set_from_paths([folder / name for name in ordered], output_name=wanted[0])


def part_set_from_paths(paths: list[Path] | tuple[Path, ...], *, output_name: str | None = None) -> PartSet:
    """A :class:`PartSet` from parts given explicitly, in the given order (checked to exist, not LFS pointers)."""
    if not paths:
        raise PartSetError("no parts given")
    parts = tuple(Path(p) for p in paths)
    seen: set[tuple[int, int]] = set()
    total = 0
    for part in parts:
        try:
            stat = part.stat()
        except FileNotFoundError:
            raise PartSetError(f"{part}: part not found; check the name or download it") from None
        if not part.is_file():
            raise PartSetError(f"{part}: not a regular file")
        identity = (stat.st_dev, stat.st_ino)
        if identity in seen:
            raise PartSetError(f"{part}: given twice; each part must appear once")
        seen.add(identity)
        _check_not_pointer(part, stat.st_size)
        total += stat.st_size
    if output_name is None:
        parsed = parse_part_name(parts[0].name)
        output_name = parsed.output_name if parsed else parts[0].name + ".joined"
    return PartSet(output_name=output_name, parts=parts, total_size=total)


def _check_not_pointer(part: Path, size: int) -> None:
    if size > 1024:
        return
    with open(part, "rb") as handle:
        head = handle.read(len(LFS_POINTER_PREFIX))
    if head == LFS_POINTER_PREFIX:
        from ..errors import LfsPointerError

        raise LfsPointerError(f"{part}: this is a Git LFS pointer file, not the data; fetch the real file "
                              f"(git lfs pull, or gptq-tools download)")


def check_safetensors_parts(part_set: PartSet) -> int:
    """Check that the parts form a complete safetensors file by its header (catches a wrong first part,
    a truncated, missing or extra part before any byte is copied). Returns the expected total size.

    Raises:
        PartSetError: the header disagrees with the parts (the message names the part at fault).
    """
    from .safetensors_format import read_header_from

    with MultiPartReader(part_set.parts) as reader:
        try:
            header = read_header_from(reader, reader.size, source=f"{part_set.output_name} (from parts)")
        except SafetensorsFormatError as exc:
            expected = _declared_size(reader)
            if expected is not None and expected != reader.size:
                raise PartSetError(_size_mismatch_message(part_set, expected)) from None
            raise PartSetError(f"{part_set.parts[0]}: the parts do not form a valid safetensors file: {exc}; is "
                               f"{part_set.parts[0].name} really the first part?") from None
    return header.file_size


def _declared_size(reader: MultiPartReader) -> int | None:
    """The file size a safetensors header declares (8 + N + end of the last tensor), or None."""
    import struct

    from .json_strict import JsonRejected, loads_strict

    reader.seek(0)
    prefix = reader.read(8)
    if len(prefix) < 8:
        return None
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > 100_000_000 or 8 + header_len > reader.size:
        return None
    try:  # bounded, like the validator: a hostile header must not recurse or take minutes here either
        document = loads_strict(reader.read(header_len))
        ends = [dict(v)["data_offsets"][1] for k, v in document if k != "__metadata__"]  # type: ignore[union-attr]
    except (JsonRejected, ValueError, KeyError, TypeError, IndexError):
        return None
    if not all(type(end) is int for end in ends):
        return None
    return 8 + header_len + max(ends, default=0)


def _size_mismatch_message(part_set: PartSet, expected: int) -> str:
    sizes = part_set.sizes
    names = [p.name for p in part_set.parts]
    actual = sum(sizes)
    if actual > expected:
        running = 0
        for count, size in enumerate(sizes, start=1):
            running += size
            if running == expected and count < len(sizes):
                return (f"{part_set.folder}: extra part(s) {', '.join(names[count:])}: the header of "
                        f"{part_set.output_name} says {expected} bytes, which the parts before them already "
                        f"make; remove the extra part(s)")
        return (f"{part_set.folder}: the parts add up to {actual} bytes but {part_set.output_name}'s header says "
                f"{expected}; a part is too long or does not belong to this set")
    short = expected - actual
    full = max(sizes[:-1], default=sizes[0]) if len(sizes) > 1 else sizes[0]
    odd = [names[i] for i, size in enumerate(sizes[:-1]) if size != full]
    if odd:
        return (f"{odd[0]}: part is truncated ({sizes[names.index(odd[0])]} bytes where the other parts have "
                f"{full}); the set is {short} bytes short. Download the part again")
    if short <= full:
        return (f"{names[-1]}: the last part looks truncated or the next part is missing; the set is {short} bytes "
                f"short of the {expected} bytes {part_set.output_name}'s header declares. Download it again")
    return (f"{part_set.folder}: part(s) after {names[-1]} are missing: the set is {short} bytes short of the "
            f"{expected} bytes {part_set.output_name}'s header declares")


class MultiPartReader(io.RawIOBase):
    """A read-only, seekable file object over the concatenation of several files."""

    def __init__(self, paths: list[Path] | tuple[Path, ...]) -> None:
        super().__init__()
        self.paths = tuple(Path(p) for p in paths)
        self._starts: list[int] = []
        position = 0
        for path in self.paths:
            self._starts.append(position)
            position += os.path.getsize(path)
        self.size = position
        self._position = 0
        self._handles: dict[int, io.BufferedReader] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        total = 0
        while total < len(view) and self._position < self.size:
            index = self._part_at(self._position)
            handle = self._handles.get(index)
            if handle is None:
                handle = self._handles[index] = open(self.paths[index], "rb")  # noqa: SIM115 - closed in close()
            handle.seek(self._position - self._starts[index])
            end = self._starts[index + 1] if index + 1 < len(self.paths) else self.size
            got = handle.readinto(view[total: total + min(len(view) - total, end - self._position)])
            if not got:
                raise OSError(f"{self.paths[index]}: shorter than when the part set was opened")
            total += got
            self._position += got
        return total

    def _part_at(self, position: int) -> int:
        low, high = 0, len(self._starts) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if self._starts[middle] <= position:
                low = middle
            else:
                high = middle - 1
        return low

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        super().close()
