"""JSON parsing that accepts exactly what serde_json (the reference safetensors reader's parser) accepts.

Python's :mod:`json` is more lenient than serde_json and less bounded: it accepts ``NaN``/``Infinity``,
lone UTF-16 surrogate escapes (``"\\ud800"``) and numbers out of the f64 range, turns a 5,000-digit
integer into a ``ValueError`` (the interpreter's digit limit) and recurses until ``RecursionError`` on
deep nesting. :func:`loads_strict` closes those gaps so that a document is accepted here if and only if
``serde_json::from_str`` (default features, as built into safetensors) accepts it, with work bounded
by the input's length:

- nesting deeper than serde_json's recursion limit (127 levels) is refused before parsing;
- ``NaN``, ``Infinity`` and ``-Infinity`` are refused;
- numbers are classified the way serde_json's parser does (``u64``, ``i64`` or ``f64``, using its own
  non-round-trip float algorithm, so the out-of-range boundary is the same), and out-of-range
  numbers are refused;
- strings containing a lone surrogate are refused;
- objects keep every key/value pair in order (as :class:`JsonObject`), so the caller can apply
  serde's duplicate-field rules.

Serde's typing rules (which values deserialize into which Rust types) are the caller's business.
"""

from __future__ import annotations

import json
import re
from typing import Union

import numpy as np

#: serde_json's default recursion limit is 128; the container that would reach it is refused.
MAX_DEPTH = 127

_U64_MAX = 2**64 - 1
_I32_MAX = 2**31 - 1
_I32_MIN = -(2**31)
#: serde_json's POW10 table (``1e0`` ... ``1e308`` as f64 literals).
_POW10 = tuple(float(f"1e{i}") for i in range(309))

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NUMBER = re.compile(r"(-?)(0|[1-9][0-9]*)(?:\.([0-9]+))?(?:[eE]([-+]?)([0-9]+))?")
_DEPTH_CHUNK = 1 << 20


class JsonRejected(ValueError):
    """The document is not one serde_json would accept; ``offset`` is a byte offset, or None."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


class JsonObject(list):  # type: ignore[type-arg]
    """A JSON object as the ordered list of its ``(key, value)`` pairs, duplicates kept."""


class JsonFloat(float):
    """A number serde_json parses as f64 (a fraction, an exponent, ``-0``, or an integer past u64)."""


JsonValue = Union[None, bool, int, float, str, list, JsonObject]  # noqa: UP007 (runtime alias)


def max_nesting(raw: bytes, *, stop_above: int | None = None) -> int:
    """Deepest nesting of arrays and objects in the JSON text ``raw`` (exact when ``raw`` is valid JSON).

    Strings are removed first, so brackets inside them do not count; the running depth is computed in
    numpy chunks (no recursion), stopping at the first chunk that goes deeper than ``stop_above``.
    """
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    deepest, level = 0, 0
    for start in range(0, len(brackets), _DEPTH_CHUNK):
        chunk = np.frombuffer(brackets, dtype=np.uint8, count=min(_DEPTH_CHUNK, len(brackets) - start),
                              offset=start)
        steps = np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1).astype(np.int64)
        running = np.cumsum(steps) + level
        deepest = max(deepest, int(running.max()))
        level = int(running[-1])
        if stop_above is not None and deepest > stop_above:
            break
    return deepest


def loads_strict(raw: bytes) -> JsonValue:
    """Parse the UTF-8 JSON document ``raw`` accepting exactly what serde_json accepts (module docstring).

    Returns:
        The document, objects as :class:`JsonObject`, serde-f64 numbers as :class:`JsonFloat`.

    Raises:
        JsonRejected: serde_json would refuse the document (the message says why; ``offset`` is the
            byte offset in ``raw`` where known).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRejected("not valid UTF-8", exc.start) from None
    if max_nesting(raw, stop_above=MAX_DEPTH) > MAX_DEPTH:
        raise JsonRejected(f"nested more than {MAX_DEPTH} levels deep (the reference reader's limit)")
    try:
        document = json.loads(text, object_pairs_hook=JsonObject, parse_int=serde_number,
                              parse_float=serde_number, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise JsonRejected(exc.msg, len(text[:exc.pos].encode("utf-8"))) from None
    _refuse_lone_surrogates(document)
    return document


def serde_number(literal: str) -> int | float:
    """The value serde_json gives the JSON number ``literal``: an int for u64/i64, else a :class:`JsonFloat`.

    Ported from serde_json's ``parse_integer``/``parse_decimal``/``parse_exponent``/``f64_from_parts``
    (without the ``float_roundtrip`` feature), so the same literals are out of range.

    Raises:
        JsonRejected: the number is out of the f64 range (serde_json's "number out of range").
    """
    match = _NUMBER.fullmatch(literal)
    if match is None:
        raise JsonRejected(f"invalid number {literal[:40]!r}")
    sign, integer, fraction, exp_sign, exp_digits = match.groups()
    positive = sign == ""
    if fraction is None and exp_digits is None:
        if len(integer) <= 20 and int(integer) <= _U64_MAX:
            value = int(integer)
            if positive:
                return value
            if 0 < value <= 2**63:
                return -value
            return JsonFloat(-float(value))  # "-0" and i64 underflow become f64, as in serde_json
    significand, exponent = 0, 0
    for index, char in enumerate(integer):
        digit = ord(char) - 48
        if _overflows(significand, digit, _U64_MAX):
            exponent = len(integer) - index  # the remaining integer digits only scale
            break
        significand = significand * 10 + digit
    if fraction is not None:
        significand, exponent = _fraction(significand, exponent, fraction)
    if exp_digits is not None:
        stripped = exp_digits.lstrip("0")
        if len(stripped) > 10 or (stripped and int(stripped) > _I32_MAX):
            if significand != 0 and exp_sign != "-":
                raise JsonRejected("number out of range")
            return JsonFloat(0.0 if positive else -0.0)
        power = int(stripped or "0")
        exponent = exponent - power if exp_sign == "-" else exponent + power
        exponent = max(_I32_MIN, min(_I32_MAX, exponent))
    value = _f64_from_parts(significand, exponent)
    return JsonFloat(value if positive else -value)


def _overflows(value: int, digit: int, limit: int) -> bool:
    return value >= limit // 10 and (value > limit // 10 or digit > limit % 10)


def _fraction(significand: int, exponent: int, fraction: str) -> tuple[int, int]:
    """serde_json's ``parse_decimal``: fraction digits join the significand until it would overflow.

    After a long integer the significand is already capped, yet a small digit may still fit, exactly
    as in serde_json (``parse_long_integer`` hands over to ``parse_decimal``).
    """
    if significand == 0:
        zeros = len(fraction) - len(fraction.lstrip("0"))
        exponent -= zeros
        fraction = fraction[zeros:]
    for char in fraction:
        digit = ord(char) - 48
        if _overflows(significand, digit, _U64_MAX):
            break  # parse_decimal_overflow: the remaining digits are ignored
        significand = significand * 10 + digit
        exponent -= 1
    return significand, exponent


def _f64_from_parts(significand: int, exponent: int) -> float:
    value = float(significand)
    while True:
        magnitude = abs(exponent)
        if magnitude < len(_POW10):
            if exponent >= 0:
                value *= _POW10[magnitude]
                if value == float("inf"):
                    raise JsonRejected("number out of range")
            else:
                value /= _POW10[magnitude]
            return value
        if value == 0.0:
            return value
        if exponent >= 0:
            raise JsonRejected("number out of range")
        value /= 1e308
        exponent += 308


def _refuse_constant(name: str) -> float:
    raise JsonRejected(f"{name} is not JSON")


def _refuse_lone_surrogates(value: JsonValue) -> None:
    if isinstance(value, str):
        _check_string(value)
    elif isinstance(value, JsonObject):
        for key, item in value:
            _check_string(key)
            _refuse_lone_surrogates(item)
    elif isinstance(value, list):
        for item in value:
            _refuse_lone_surrogates(item)


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JsonRejected(f"lone surrogate escape in string {text[:40]!r} (index {exc.start})") from None
