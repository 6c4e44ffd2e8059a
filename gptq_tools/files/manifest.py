"""Checksum manifests in ``sha256sum`` format, parsed line by line exactly as GNU coreutils does.

Lines are bytes: ``HASH  name`` (text mode), ``HASH *name`` (binary mode), ``HASH name`` (one space, the
model cards' form, which sha256sum reads as "BSD reversed" and does not let a manifest mix with the
two-space form), BSD tags ``SHA256 (name) = HASH``, ``#`` comments in the first column, a trailing CR,
and names escaped with a leading ``\\`` (``\\\\``, ``\\n``, ``\\r``). A line that does not parse is kept
as a :class:`MalformedLine` so the caller can warn and check the rest, as ``sha256sum -c`` does.

Names are bytes on disk; :attr:`ManifestEntry.name` is their ``os.fsdecode`` form (surrogate escapes
for bytes that are not UTF-8), so they round-trip to the same bytes (``os.fsencode``).
"""

from __future__ import annotations

import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..constants import MANIFEST_MAX_BYTES
from ..errors import ManifestError
from .fileio import write_bytes_atomic

HEX64_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_HEX_BYTES = frozenset(b"0123456789abcdefABCDEF")
_WHITE = (0x20, 0x09)  # coreutils' ISWHITE: space and tab
_MIN_LINE = 64 + 1 + 1  # hash, a blank, a one-character name
_TAG = b"SHA256"
#: What ``sha256sum -c`` calls a manifest read from ``-``.
STDIN_NAME = "standard input"
IMPROPER = "improperly formatted SHA256 checksum line"


@dataclass(frozen=True)
class ManifestEntry:
    """One properly formatted line: the file's name, its expected SHA256 and where the line is."""

    name: str
    sha256: str
    line: int
    binary: bool = False

    @property
    def raw_name(self) -> bytes:
        """The name's bytes as the manifest gives them (after unescaping)."""
        return os.fsencode(self.name)


@dataclass(frozen=True)
class MalformedLine:
    """A line ``sha256sum -c`` would count as improperly formatted; ``reason`` says why when it is ours."""

    line: int
    reason: str = IMPROPER
    text: bytes = b""


@dataclass
class ParsedManifest:
    """Everything one manifest holds, in file order."""

    source: str
    entries: list[ManifestEntry] = field(default_factory=list)
    malformed: list[MalformedLine] = field(default_factory=list)


class ManifestParser:
    """sha256sum's line parser, including its one piece of state.

    coreutils remembers, for the whole run (every manifest given), whether the first line it saw with a
    hash, one blank and a name not starting with a blank or ``*`` was in that "BSD reversed" form; after
    that the other form is refused. One parser per ``verify`` run reproduces this. ``mixed_forms=True``
    accepts both forms in one manifest (for join, load and download, which only need the hashes).
    """

    def __init__(self, *, mixed_forms: bool = False) -> None:
        self._bsd_reversed: bool | None = None
        self._mixed_forms = mixed_forms

    def parse(self, data: bytes, *, source: str, from_stdin: bool = False) -> ParsedManifest:
        """Parse a whole manifest; ``source`` names it in messages (``standard input`` for ``-``)."""
        parsed = ParsedManifest(source=source)
        # Lines end at LF only: one CR right before it is dropped, as coreutils does, but a lone CR is
        # part of the line (bytes.splitlines would also split there, and check a line sha256sum never sees).
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        for number, raw in enumerate(lines, start=1):
            if raw.startswith(b"#"):
                continue
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                continue
            if b"\0" in line:
                parsed.malformed.append(MalformedLine(number, "a file name holds a NUL byte, which no file name can",
                                                      line))
                continue
            split = self.split_line(line)
            if split is None or (from_stdin and split[0] == b"-"):
                parsed.malformed.append(MalformedLine(number, IMPROPER, line))
                continue
            name, digest, binary = split
            parsed.entries.append(ManifestEntry(os.fsdecode(name), digest.decode("ascii").lower(), number, binary))
        return parsed

    def split_line(self, line: bytes) -> tuple[bytes, bytes, bool] | None:
        """``(name, hex digest, binary)`` of one line without its newline, or None (coreutils' ``split_3``)."""
        i = 0
        while i < len(line) and line[i] in _WHITE:
            i += 1
        escaped = line[i:i + 1] == b"\\"
        if escaped:
            i += 1
        if line.startswith(_TAG, i):
            i += len(_TAG)
            if line[i:i + 1] == b" ":
                i += 1
            if line[i:i + 1] != b"(":
                return None
            return _bsd_tag(line[i + 1:], escaped)
        if len(line) - i < _MIN_LINE + (line[i:i + 1] == b"\\"):
            return None
        digest = line[i:i + 64]
        i += 64
        if line[i] not in _WHITE or not _is_hex(digest):
            return None
        i += 1
        binary = False
        if len(line) - i == 1 or line[i:i + 1] not in (b" ", b"*"):
            if self._bsd_reversed is False:
                return None
            self._bsd_reversed = True
        elif self._bsd_reversed is not True:
            self._bsd_reversed = False
            binary = line[i:i + 1] == b"*"
            i += 1
        name = line[i:]
        if self._mixed_forms:
            self._bsd_reversed = None
        if escaped:
            unescaped = unescape_name(name)
            if unescaped is None:
                return None
            name = unescaped
        return name, digest, binary


def _is_hex(digest: bytes) -> bool:
    return len(digest) == 64 and all(byte in _HEX_BYTES for byte in digest)


def _bsd_tag(rest: bytes, escaped: bool) -> tuple[bytes, bytes, bool] | None:
    """``name) = HASH`` after ``SHA256 (`` (coreutils' ``bsd_split_3``: the name ends at the last ``)``)."""
    end = rest.rfind(b")")
    if end < 0:
        return None
    name = rest[:end]
    if escaped:
        unescaped = unescape_name(name)
        if unescaped is None:
            return None
        name = unescaped
    tail = rest[end + 1:].lstrip(b" \t")
    if not tail.startswith(b"="):
        return None
    digest = tail[1:].lstrip(b" \t")
    return (name, digest, False) if _is_hex(digest) else None


def unescape_name(name: bytes) -> bytes | None:
    """Undo sha256sum's escaping (``\\\\``, ``\\n``, ``\\r``); None where coreutils refuses the line."""
    out = bytearray()
    i = 0
    while i < len(name):
        byte = name[i]
        if byte == 0x5C:
            following = name[i + 1:i + 2]
            if following == b"n":
                out += b"\n"
            elif following == b"r":
                out += b"\r"
            elif following == b"\\":
                out += b"\\"
            else:
                return None
            i += 2
            continue
        out.append(byte)
        i += 1
    return bytes(out)


def escape_name(name: bytes) -> tuple[bytes, bool]:
    """sha256sum's escaping of a name for output: ``(escaped, needs a leading backslash)``."""
    if not any(char in name for char in (b"\\", b"\n", b"\r")):
        return name, False
    return name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r"), True


def read_manifest_bytes(path: str | os.PathLike[str], *, limit: int = MANIFEST_MAX_BYTES) -> bytes:
    """The bytes of a manifest (``-`` is standard input), refusing anything that is not a small text file.

    Raises:
        ManifestError: ``path`` is a folder, a device or socket, or holds more than ``limit`` bytes.
        OSError: it cannot be opened or read (the caller words it like sha256sum).
    """
    shown = str(path)
    if shown == "-":
        return _bounded_read(sys.stdin.buffer, STDIN_NAME, limit)
    info = os.stat(path)
    if stat.S_ISDIR(info.st_mode):
        inside = Path(path) / "SHA256SUMS"
        hint = f"-c {inside}" if inside.is_file() else "the checksum file inside it, e.g. -c DIR/SHA256SUMS"
        raise ManifestError(f"{shown}: is a folder, not a checksum list; give {hint}")
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
        raise ManifestError(f"{shown}: is a device or socket, not a checksum list; give a SHA256SUMS file "
                            f"(or - for standard input)")
    if stat.S_ISREG(info.st_mode) and info.st_size > limit:
        raise ManifestError(f"{shown}: {info.st_size} bytes is too large for a checksum list (at most {limit}); "
                            f"is it really a SHA256SUMS file?")
    with open(path, "rb") as handle:
        return _bounded_read(handle, shown, limit)


def _bounded_read(handle: object, shown: str, limit: int) -> bytes:
    data = handle.read(limit + 1)  # type: ignore[attr-defined]
    if len(data) > limit:
        raise ManifestError(f"{shown}: more than {limit} bytes is too large for a checksum list; "
                            f"is it really a SHA256SUMS file?")
    return bytes(data)


def parse_manifest(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{name: sha256}`` from a manifest file (names relative to the manifest's folder).

    Raises:
        ManifestError: the manifest is missing or not a small file, a line does not parse, a name is
            unsafe, or a name is listed twice with two hashes.
    """
    return {entry.name: entry.sha256 for entry in read_manifest_entries(path)}


def read_manifest_entries(path: str | os.PathLike[str]) -> list[ManifestEntry]:
    """Entries of a manifest file in file order, strictly (see :func:`parse_manifest`)."""
    try:
        data = read_manifest_bytes(path)
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest: {exc.strerror or exc}") from None
    return _strict(ManifestParser(mixed_forms=True).parse(data, source=str(path)))


def parse_manifest_text(text: str, *, source: str = "manifest") -> list[ManifestEntry]:
    """Parse manifest ``text`` strictly (any line that does not parse is an error); ``source`` names it.

    Raises:
        ManifestError: as :func:`parse_manifest`.
    """
    return _strict(ManifestParser(mixed_forms=True).parse(text.encode("utf-8", "surrogateescape"), source=source))


def _strict(parsed: ParsedManifest) -> list[ManifestEntry]:
    if parsed.malformed:
        bad = parsed.malformed[0]
        text = os.fsdecode(bad.text)
        shown = text if len(text) <= 80 else text[:77] + "..."
        what = f"cannot parse {shown!r}" if bad.reason == IMPROPER else bad.reason
        raise ManifestError(f"{parsed.source} line {bad.line}: {what}; expected '<64 hex digits>  <file name>'")
    seen: dict[str, str] = {}
    for entry in parsed.entries:
        _check_safe_name(entry.name, parsed.source, entry.line)
        if seen.get(entry.name, entry.sha256) != entry.sha256:
            raise ManifestError(f"{parsed.source} line {entry.line}: {entry.name} is listed twice with different "
                                f"hashes")
        seen[entry.name] = entry.sha256
    return parsed.entries


def unsafe_name_reason(name: str, *, windows_too: bool = False) -> str | None:
    """Why ``name`` must not become a path under the manifest's folder, or None when it may.

    Args:
        name: a name as the manifest lists it.
        windows_too: also read ``\\`` as a separator and ``C:`` as a drive (manifests we consume from
            elsewhere); ``verify`` leaves it off, because ``sha256sum -c`` on Linux reads a backslash as
            part of the file name.
    """
    pure = PurePosixPath(name.replace("\\", "/") if windows_too else name)
    if not name:
        return "the name is empty"
    if pure.is_absolute() or windows_too and re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in pure.parts:
        return "a path with '..'"
    return None


def _check_safe_name(name: str, source: str, number: int) -> None:
    reason = unsafe_name_reason(name, windows_too=True)
    if reason is not None:
        raise ManifestError(f"{source} line {number}: refusing path {name!r} ({reason}): manifest names must stay "
                            f"inside the manifest's folder")


def format_manifest_line(name: str, sha256: str) -> str:
    """One ``sha256sum`` line (escaped like GNU coreutils when the name holds a backslash, CR or newline)."""
    escaped, needs = escape_name(os.fsencode(name))
    return ("\\" if needs else "") + f"{sha256}  {os.fsdecode(escaped)}"


def write_manifest(path: str | os.PathLike[str], entries: dict[str, str], *, merge: bool = True) -> None:
    """Write ``entries`` (name -> sha256) as a sha256sum manifest, atomically.

    With ``merge``, entries already in an existing manifest at ``path`` are kept unless replaced.
    """
    path = Path(path)
    combined: dict[str, str] = {}
    if merge and path.exists():
        combined.update(parse_manifest(path))
    combined.update(entries)
    text = "".join(format_manifest_line(name, digest) + "\n" for name, digest in combined.items())
    write_bytes_atomic(path, text.encode("utf-8", "surrogateescape"), force=True)


def is_sha256(text: str) -> bool:
    return bool(HEX64_RE.match(text))
