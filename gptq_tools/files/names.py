"""Names that come from outside (a Hub listing, a part name, a manifest line) checked before they become paths.

A name from outside is data: a repository, a mirror or a proxy decides it. It is checked here, once,
before anything is created from it, at least as strictly as huggingface_hub's
``_local_folder._validate_relative_filename`` (what ``hf download`` refuses), so that
``folder / name`` always stays inside ``folder`` on POSIX and on Windows.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from pathlib import PureWindowsPath

from ..errors import UnsafeNameError

#: Longest accepted name, and longest accepted path segment, in UTF-8 bytes (Linux's PATH_MAX and NAME_MAX).
MAX_NAME_BYTES = 4096
MAX_SEGMENT_BYTES = 255


def validate_relative_name(name: str, *, what: str) -> str:
    """Check that ``name`` is a safe ``/``-separated path relative to a folder, and return it unchanged.

    Refused: anything but a non-empty ``str``; an absolute path, a Windows drive (``C:``) or UNC prefix;
    a backslash; an empty, ``.`` or ``..`` segment (so no leading, trailing or doubled ``/``); NUL and
    every other control character (Unicode category ``Cc``); text that is not encodable as UTF-8 (lone
    surrogates); a segment over 255 bytes or a name over 4096 bytes (UTF-8).

    Args:
        name: the name as it came from outside.
        what: where it came from, for the message (e.g. ``"org/model@main: file"``).

    Returns:
        ``name``, which can now be joined to a folder.

    Raises:
        UnsafeNameError: the name is unsafe; the message quotes it and says why.
    """
    reason = _unsafe_reason(name)
    if reason is not None:
        raise UnsafeNameError(f"{what} {name!r} is not a safe relative file name ({reason}); nothing was written. "
                              f"Ask the repository owner to rename it")
    return name


def _unsafe_reason(name: object) -> str | None:
    """Why ``name`` is unsafe, or None when it is fine."""
    if not isinstance(name, str):
        return f"a name must be text, not {type(name).__name__}"
    if not name:
        return "it is empty"
    bad = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        return f"it contains the control character U+{ord(bad):04X}"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid Unicode (a lone surrogate)"
    if "\\" in name:
        return "it contains a backslash"
    if name.startswith("/"):
        return "it is an absolute path"
    if size > MAX_NAME_BYTES:
        return f"it is {size} bytes long, more than {MAX_NAME_BYTES}"
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            return f"it has {'an empty' if not segment else 'a ' + repr(segment)} path segment"
        if PureWindowsPath(segment).drive:
            return f"segment {segment!r} is a drive prefix on Windows"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"segment {segment[:40]!r}... is longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def check_no_clashes(names: Iterable[str], *, what: str) -> None:
    """Check that validated names can all exist in one folder at once.

    Refused: the same name twice, and a file that is also a folder of another name (``a`` beside
    ``a/b``), which would make one of them impossible to write.

    Args:
        names: names already checked with :func:`validate_relative_name`.
        what: where they came from, for the message (e.g. ``"org/model@main"``).

    Raises:
        UnsafeNameError: two names clash; the message names both.
    """
    files: set[str] = set()
    for name in names:
        if name in files:
            raise UnsafeNameError(f"{what}: {name!r} is listed twice; the listing is inconsistent, nothing was "
                                  f"written. Ask the repository owner to fix it")
        files.add(name)
    for name in sorted(files):
        segments = name.split("/")
        for depth in range(1, len(segments)):
            folder = "/".join(segments[:depth])
            if folder in files:
                raise UnsafeNameError(f"{what}: {folder!r} is a file but {name!r} needs it to be a folder; both "
                                      f"cannot exist, nothing was written. Ask the repository owner to rename one")
