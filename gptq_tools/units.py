"""Human sizes, with accelerate's conventions.

``GiB``/``MiB``/``KiB`` are powers of 2, ``GB``/``MB``/``KB`` powers of 10, and a lowercase ``b`` after
the prefix means bits (``"8Gb"`` is one GB). A bare number takes ``default_unit`` (plain bytes unless the
caller says otherwise: memory caps use GiB, as text-generation-webui does).
"""

from __future__ import annotations

import re

from .errors import UsageError

_PREFIX = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5}
_BINARY = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgGtTpP]?)(i?)([Bb]?)\s*$")


def parse_size(text: str | int | float, *, default_unit: str = "B", what: str = "size") -> int:
    """Parse ``"45GiB"``, ``"5GB"``, ``"512MiB"``, ``"8Gb"``, ``"123"`` into a number of bytes.

    Args:
        text: the size; ints and floats are taken as a count of ``default_unit``.
        default_unit: unit of a bare number (``"B"``, ``"GiB"``, ``"GB"``, ...).
        what: name of the setting, used in the error message.

    Returns:
        The size in bytes (rounded down to a whole byte).

    Raises:
        UsageError: the text is not a size.
    """
    if isinstance(text, bool):
        raise UsageError(f"{what}: {text!r} is not a size; write it like 45GiB, 5GB or 512MiB")
    if isinstance(text, (int, float)):
        number, unit = float(text), default_unit
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise UsageError(f"{what}: {text!r} is not a size; write it like 45GiB, 5GB or 512MiB")
        number = float(match.group(1))
        prefix, binary, byte_char = match.group(2).upper(), match.group(3), match.group(4)
        if not prefix and not binary and not byte_char:
            unit = default_unit
        else:
            unit = f"{prefix}{binary}{byte_char or 'B'}"
        if binary and not prefix:
            raise UsageError(f"{what}: {text!r} is not a size; 'i' needs a prefix as in GiB")
    return int(number * _unit_bytes(unit, what=what, text=text))


def _unit_bytes(unit: str, *, what: str, text: object) -> float:
    match = re.fullmatch(r"([KMGTP]?)(i?)([Bb])", unit.replace("k", "K"))
    if not match:
        raise UsageError(f"{what}: unknown unit in {text!r}; use B, KB/KiB, MB/MiB, GB/GiB or TB/TiB")
    prefix, binary, byte_char = match.groups()
    factor = _BINARY[prefix] if binary else _PREFIX[prefix]
    return factor / 8 if byte_char == "b" else factor


def format_size(num_bytes: int | float, *, binary: bool = True) -> str:
    """``format_size(48318382080) == '45.00 GiB'``; ``binary=False`` gives GB."""
    base, suffixes = (1024.0, ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]) if binary else (
        1000.0, ["B", "KB", "MB", "GB", "TB", "PB"])
    value = float(num_bytes)
    for suffix in suffixes:
        if abs(value) < base or suffix == suffixes[-1]:
            return f"{int(value)} B" if suffix == "B" else f"{value:.2f} {suffix}"
        value /= base
    raise AssertionError("unreachable")
