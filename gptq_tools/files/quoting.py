"""File names in messages quoted exactly as GNU coreutils quotes them (``quotef``), for sha256sum parity.

coreutils' ``error (0, errno, "%s", quotef (name))`` uses gnulib's ``shell_escape_quoting_style`` with
``:`` quoted too: a plain name is printed as is; otherwise it is wrapped in single quotes (``'\\''`` for a
quote), unprintable bytes become ``'$'\\ooo''`` escapes, and a name whose only problem is an apostrophe
gets double quotes. Written by hand because no Python library reproduces gnulib's rules byte for byte;
this follows gnulib ``lib/quotearg.c`` (``quotearg_buffer_restyled``) in a UTF-8 locale.
"""

from __future__ import annotations

import string
import unicodedata

_SAFE = frozenset((string.ascii_letters + string.digits + "%+,-./:]_").encode())
_SHELL_SPECIAL = frozenset(b' !"$&()*;<=>[^`|')
_NAMED_ESCAPES = {0x07: "a", 0x08: "b", 0x0C: "f", 0x0A: "n", 0x0D: "r", 0x09: "t", 0x0B: "v"}


def _chars(name: bytes) -> list[tuple[bytes, bool]]:
    """Split ``name`` into characters: ``(bytes, printable)``; bytes that are not UTF-8 stand alone."""
    chars: list[tuple[bytes, bool]] = []
    i = 0
    while i < len(name):
        if name[i] < 0x80:
            chars.append((name[i:i + 1], 0x20 <= name[i] < 0x7F))
            i += 1
            continue
        for length in (2, 3, 4):
            try:
                text = name[i:i + length].decode("utf-8")
            except UnicodeDecodeError:
                continue
            chars.append((name[i:i + length], _printable(text)))
            i += length
            break
        else:
            chars.append((name[i:i + 1], False))
            i += 1
    return chars


def _printable(char: str) -> bool:
    """glibc's ``iswprint`` in a UTF-8 locale: everything but controls, separators of lines and holes."""
    return unicodedata.category(char) not in ("Cc", "Cs", "Cn", "Zl", "Zp")


def _needs_quotes(name: bytes, chars: list[tuple[bytes, bool]]) -> bool:
    if not name:
        return True
    for index, (char, printable) in enumerate(chars):
        byte = char[0]
        if not printable or (len(char) == 1 and (byte in _SHELL_SPECIAL or byte in b"'\\?:")):
            return True
        if len(char) == 1 and ((byte in b"#~" and index == 0) or (byte in b"{}" and len(name) == 1)):
            return True
    return False


def _compatible(char: bytes, printable: bool, index: int, total: int) -> bool:
    """gnulib's ``c_and_shell_quote_compat``: the character reads the same inside double quotes."""
    if len(char) > 1:
        return printable
    byte = char[0]
    if byte in _SAFE or byte in b" '":
        return True
    if byte in b"#~":
        return index == 0
    if byte in b"{}":
        return total == 1
    return printable and byte not in _SHELL_SPECIAL and byte not in b"\\?"


def quote_name(name: bytes) -> bytes:
    """``name`` as coreutils' ``quotef`` prints it in an error message."""
    chars = _chars(name)
    if not _needs_quotes(name, chars):
        return name
    if b"'" in name and all(_compatible(c, p, i, len(name)) for i, (c, p) in enumerate(chars)):
        return b'"' + name + b'"'
    out = bytearray(b"'")
    # inside a $'...' run. gnulib quotes a name holding ' twice (a scan, then the real pass) and does not
    # reset this between the passes: when the name ends inside a run, the real pass starts inside one.
    # So a first plain character gets a stray '' before it, and a first escaped one no $' before it.
    escaping = b"'" in name and _escaped(*chars[-1])
    for char, printable in chars:
        if char == b"'":
            out += b"'\\''"  # closes a $'...' run too
            escaping = False
            continue
        escape = _NAMED_ESCAPES.get(char[0]) if len(char) == 1 else None
        if escape is not None or not printable:
            if not escaping:
                out += b"'$'"
                escaping = True
            out += ("\\" + escape).encode() if escape else b"".join(b"\\%03o" % byte for byte in char)
            continue
        if escaping:
            out += b"''"
            escaping = False
        out += char
    out += b"'"
    return bytes(out)


def _escaped(char: bytes, printable: bool) -> bool:
    """Whether gnulib writes ``char`` inside a ``$'...'`` run (a named escape or an unprintable character)."""
    return (len(char) == 1 and char[0] in _NAMED_ESCAPES) or not printable
