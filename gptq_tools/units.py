"""Human sizes, read exactly as accelerate reads them.

``KiB``/``MiB``/``GiB`` (any case) are powers of 2; ``KB``/``MB``/``GB`` powers of 10, and when the text ends
in a lowercase ``b`` (``"8Gb"``, ``"60gb"``) accelerate counts *bits*, so ``"60gb"`` is 7.5 GB. A bare whole
number is a count of bytes, as an ``int`` is in accelerate's ``max_memory`` and transformers'
``max_shard_size``. Everything accelerate refuses is refused here too (``"60G"``, ``"60"``-less units such as
``"60B"``, ``"1TB"``, negative sizes), with a message saying how to write the size.
``tests/test_units.py`` runs accelerate's own parser beside this one over a table of inputs.
"""

from __future__ import annotations

import logging
import math
import re

from .errors import UsageError

logger = logging.getLogger(__name__)

#: Suffix (upper-cased) -> bytes per unit, in the order accelerate tests them ("GIB" before "GB").
_UNITS: tuple[tuple[str, int], ...] = (
    ("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))
_POWERS = {"K": 10, "M": 20, "G": 30}
_BARE_BYTES = re.compile(r"\s*[0-9]+\s*")

#: What every refusal tells the user, so the accepted forms are spelled out once.
SIZE_FORMS = ("write it like 60GiB (2^30 bytes), 5GB (10^9 bytes), 512MiB or a whole number of bytes; "
              "a lowercase b means bits (8Gb = 1GB)")


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Parse ``"45GiB"``, ``"5GB"``, ``"512mib"``, ``"8Gb"`` or ``"4096"`` into a number of bytes.

    The same rules as ``accelerate.utils.modeling.convert_file_size_to_int``, which ``get_max_memory``
    applies to strings: the number before the unit is read with ``float`` and the result rounded down;
    an ``int`` (and a string of digits) is a byte count.

    Args:
        text: the size.
        what: name of the setting (``--max-memory 0``, ``--max-shard-size``), used in the error message.

    Returns:
        The size in bytes.

    Raises:
        UsageError: the text is not a size accelerate accepts, or it is negative.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise UsageError(f"{what}: {text!r} is not a size; {SIZE_FORMS}")
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"{what}: {text} is negative; {SIZE_FORMS}")
        return text
    if _BARE_BYTES.fullmatch(text):
        return int(text)
    for suffix, factor in _UNITS:
        if text.upper().endswith(suffix):
            return _scaled(text, suffix, factor, what=what)
    bare_prefix = re.fullmatch(r"\s*([-+0-9.eE_]+)\s*([kKmMgG])[iI]?\s*", text)
    if bare_prefix:
        number, prefix = bare_prefix.group(1), bare_prefix.group(2).upper()
        raise UsageError(f"{what}: {text!r} has no byte unit (accelerate refuses it): write {number}{prefix}iB "
                         f"(2^{_POWERS[prefix]}) or {number}{prefix}B (10^{_POWERS[prefix] * 3 // 10})")
    raise UsageError(f"{what}: {text!r} is not a size accelerate accepts; {SIZE_FORMS}")


def _scaled(text: str, suffix: str, factor: int, *, what: str) -> int:
    number_text = text[:-len(suffix)]
    try:
        number = float(number_text)
    except ValueError:
        raise UsageError(f"{what}: {number_text!r} in {text!r} is not a number; {SIZE_FORMS}") from None
    if not math.isfinite(number * factor):
        raise UsageError(f"{what}: {text!r} is not a finite size; {SIZE_FORMS}")
    scaled = int(number * factor)
    # accelerate divides after rounding, and only for the decimal units ("8Gib" is 8 GiB)
    if not suffix.endswith("IB") and text.endswith("b"):
        scaled //= 8
        logger.warning("%s: %r ends in a lowercase b, so it counts bits (as in accelerate): %s; write %sB for "
                       "bytes", what, text, format_size(scaled, binary=False), number_text.strip() + suffix[0])
    if scaled < 0:
        raise UsageError(f"{what}: {text!r} is negative; {SIZE_FORMS}")
    return scaled


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


def size_arg_at_least(num_bytes: int) -> str:
    """``num_bytes`` as a size word for the command line (``56.26GiB``, or a bare byte count under 1 KiB), rounded
    *up* to the two decimals :func:`format_size` shows, so that :func:`parse_size` reads it back as no less than
    ``num_bytes``: a cap that is sure to be enough."""
    number, _, suffix = format_size(num_bytes).partition(" ")
    if suffix == "B":
        return str(num_bytes)
    unit = 1024 ** (["KiB", "MiB", "GiB", "TiB", "PiB"].index(suffix) + 1)
    hundredths = math.ceil(num_bytes * 100 / unit)
    while parse_size(f"{hundredths / 100:.2f}{suffix}") < num_bytes:  # float rounding in the read-back
        hundredths += 1
    return f"{hundredths / 100:.2f}{suffix}"
