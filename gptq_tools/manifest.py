"""Checksum manifests in ``sha256sum`` format.

Reads ``HASH  name`` (text mode), ``HASH *name`` (binary mode), the model cards' ``HASH name`` (one
space), BSD tags ``SHA256 (name) = HASH``, ``#`` comments and sha256sum's backslash-escaped names.
Names must stay inside the manifest's folder: absolute paths and ``..`` are refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import ManifestError
from .fileio import write_bytes_atomic

_GNU_RE = re.compile(r"^(?P<hash>[0-9a-fA-F]{64})(?: \*| {1,2})(?P<name>.+)$")
_BSD_RE = re.compile(r"^SHA256 ?\((?P<name>.+)\) ?= ?(?P<hash>[0-9a-fA-F]{64})$")
HEX64_RE = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    sha256: str
    line: int


def parse_manifest(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{name: sha256}`` from a manifest file (names relative to the manifest's folder).

    Raises:
        ManifestError: a line does not parse, a name is unsafe, or a name is listed twice with two hashes.
    """
    return {entry.name: entry.sha256 for entry in read_manifest_entries(path)}


def read_manifest_entries(path: str | os.PathLike[str]) -> list[ManifestEntry]:
    """Entries of a manifest file in file order (see :func:`parse_manifest`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: manifest is not UTF-8 text; is it really a checksum file?") from None
    return parse_manifest_text(text, source=str(path))


def parse_manifest_text(text: str, *, source: str = "manifest") -> list[ManifestEntry]:
    """Parse manifest ``text``; ``source`` names it in errors."""
    entries: list[ManifestEntry] = []
    seen: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        match = _GNU_RE.match(body) or _BSD_RE.match(body)
        if not match:
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise ManifestError(f"{source} line {number}: cannot parse {shown!r}; "
                                f"expected '<64 hex digits>  <file name>'")
        name = _unescape(match["name"]) if escaped else match["name"]
        _check_safe_name(name, source, number)
        digest = match["hash"].lower()
        if seen.get(name, digest) != digest:
            raise ManifestError(f"{source} line {number}: {name} is listed twice with different hashes")
        seen[name] = digest
        entries.append(ManifestEntry(name=name, sha256=digest, line=number))
    return entries


def _unescape(name: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", "r": "\r"}.get(m.group(1), m.group(0)), name)


def _check_safe_name(name: str, source: str, number: int) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in pure.parts:
        raise ManifestError(f"{source} line {number}: refusing path {name!r}: manifest names must stay inside "
                            f"the manifest's folder (no absolute paths, no '..')")


def format_manifest_line(name: str, sha256: str) -> str:
    """One ``sha256sum`` line (escaped like GNU coreutils when the name holds a backslash or newline)."""
    if "\\" in name or "\n" in name:
        return "\\" + sha256 + "  " + name.replace("\\", "\\\\").replace("\n", "\\n")
    return f"{sha256}  {name}"


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
    write_bytes_atomic(path, text.encode("utf-8"), force=True)


def is_sha256(text: str) -> bool:
    return bool(HEX64_RE.match(text))
