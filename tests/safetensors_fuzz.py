"""Differential fuzzing of our safetensors validator against the reference reader.

A case is a valid safetensors file (random tensors, dtypes, names, metadata, key order, whitespace)
with up to a few mutations: structural ones on the header (duplicate keys, odd dtypes, shapes and
offsets, entries as arrays, extra fields holding NaN, huge numbers, lone surrogates or deep nesting),
then byte-level ones (flipped, inserted or deleted header bytes, a wrong length prefix, truncation,
trailing bytes). :func:`classify` runs both readers on it and says whether they agree.

Shared by ``tests/test_files_safetensors_fuzz.py`` (a few thousand cases, fixed seed) and
``scripts/fuzz_safetensors.py`` (``make fuzz``, 100,000+ cases).
"""

from __future__ import annotations

import copy
import math
import struct
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import safetensors
from hypothesis import strategies as st

from gptq_tools.errors import GptqToolsError
from gptq_tools.files.safetensors_format import DTYPE_BITS, read_header

#: Per-case bounds on our validator (the headers are at most a few hundred KB): CPU seconds (so that a
#: loaded, shared machine does not count against it) and peak Python memory, tracemalloc included.
MAX_SECONDS = 1.0
MAX_PEAK_BYTES = 64 * 1024 * 1024

AGREE, OURS_ONLY, REFERENCE_ONLY, CRASH, SLOW = "agree", "accepted-by-us-only", "accepted-by-reference-only", \
    "crash", "over-bound"


@dataclass(frozen=True)
class Raw:
    """JSON text emitted verbatim (NaN, -0, 1e400, lone surrogate escapes...)."""

    text: str


@dataclass
class Obj:
    """A JSON object as ordered pairs (duplicates allowed)."""

    pairs: list[tuple[str, object]]


def emit(value: object, ws: str = "") -> str:
    """JSON text for ``value``; ``ws`` goes around separators."""
    if isinstance(value, Raw):
        return value.text
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "1e400"
    if isinstance(value, str):
        return _emit_string(value)
    if isinstance(value, list):
        return "[" + f",{ws}".join(emit(item, ws) for item in value) + "]"
    if isinstance(value, Obj):
        return "{" + ws + f",{ws}".join(f"{_emit_string(k)}{ws}:{ws}{emit(v, ws)}" for k, v in value.pairs) + ws + "}"
    raise TypeError(type(value))


def _emit_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or 0xD800 <= ord(char) <= 0xDFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


_NAMES = ["a", "b", "w.0.qweight", "", "__metadata", "ü", "a\u00e9", "x" * 40]
_DTYPES = sorted(DTYPE_BITS)
_BAD_DTYPES: list[object] = ["F17", "u8", "", "f32", ["U8"], Obj([("U8", None)]), Obj([("U8", 1)]), Obj([]),
                             Obj([("U8", None), ("I8", None)]), Obj([("XX", None)]), None, 5, Raw('"\\ud800"')]
_NUMBERS = [Raw(t) for t in (
    "NaN", "Infinity", "-Infinity", "-0", "1e400", "-1e400", "1e-400", "1.7976931348623157e308",
    "1.7976931348623158e308", "1" + "0" * 308, "1" + "9" * 308, "1" + "0" * 5000, "0." + "0" * 400 + "1",
    "1e2147483648", "0e99999999999", "1.5", "4.0", "1e2", "1E2", "-1", "01", "1.", "+1", "-", ".5",
    "18446744073709551615", "18446744073709551616", "-9223372036854775808", "-9223372036854775809",
    "184467440737095516155", "1844674407370955161.5e0")]
_STRINGS = [Raw(t) for t in (
    '"\\ud800"', '"\\udc00"', '"\\ud83d\\ude00"', '"\\ud800\\u0041"', '"\\u0000"', '"\x01"', '"\\x"',
    '"\\/"', '"\x7f"', '"\\"', '"abc', "tru", "nul", "True")]


_LEAVES = st.one_of(st.sampled_from(_NUMBERS + _STRINGS), st.none(), st.booleans(),
                    st.integers(min_value=-(2**70), max_value=2**70), st.text(max_size=6),
                    st.floats(allow_nan=False, allow_infinity=False))
#: Any JSON-ish value, including the texts serde_json refuses.
WEIRD = st.recursive(_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.lists(st.tuples(st.sampled_from(["k", "dtype", "shape", "data_offsets", "__metadata__"]), inner),
             max_size=3).map(Obj)), max_leaves=6)
_KINDS = st.sampled_from([
    "dup-metadata", "metadata-value", "dup-tensor", "dup-field", "drop-field", "extra-field", "as-array",
    "dtype", "dim", "shape", "offsets", "entry-value", "top-key", "deep"])
# Mutations change drawn values in place: every shared constant is deep-copied when drawn, or hypothesis
# sees the generator change between replays (FlakyStrategyDefinition).
_SMALL_METADATA = st.sampled_from([None, Obj([]), Obj([("k", "v")])]).map(copy.deepcopy)
_BAD_METADATA = st.one_of(st.sampled_from(
    [None, [], Obj([("k", 1)]), Obj([("k", "v"), ("k", "w")]), Obj([("k", Raw('"\\ud800"'))])]).map(copy.deepcopy),
    WEIRD)
_NAME = st.sampled_from(_NAMES)
_EXTRA_KEY = st.sampled_from(["x", "y", "Dtype"])
_ANY_DTYPE = st.sampled_from(_DTYPES + _BAD_DTYPES).map(copy.deepcopy)
_DTYPE = st.sampled_from(_DTYPES)
_DIM_VALUE = st.one_of(st.sampled_from(_NUMBERS), st.integers(-3, 2**65), st.booleans(), WEIRD)
_SHAPE = st.sampled_from([[2**32, 2**32, 0], [0, 2**32, 2**32], [2**64 - 1, 0], [2**63, 2], [2**61, 8], [2**62], "4",
                          None, Obj([])]).map(copy.deepcopy)
_OFFSET_CHANGE = st.sampled_from(["begin", "end", "swap", "third", "weird", "huge"])
_HUGE = st.sampled_from([2**64 - 1, 2**64, 2**63])
_NUMBER = st.sampled_from(_NUMBERS)
_DEPTH = st.sampled_from([123, 124, 125, 126, 127, 128, 1000, 100_000])
_NEST_KIND = st.sampled_from(["array", "object"])
_METADATA_PAIRS = st.lists(st.tuples(st.sampled_from(["format", "k", ""]), st.text(max_size=5)), max_size=2)
_NAMES_LIST = st.lists(_NAME, max_size=4, unique=True)
_DIMS = st.lists(st.integers(0, 5), max_size=3)


def _nested(depth: int, kind: str) -> Raw:
    if kind == "array":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"k":' * depth + "1" + "}" * depth)


@st.composite
def base_documents(draw: st.DrawFn) -> tuple[Obj, int]:
    """A valid header (as an :class:`Obj`) and its data size."""
    pairs: list[tuple[str, object]] = []
    position = 0
    for name in draw(_NAMES_LIST):
        dtype = draw(_DTYPE)
        shape = draw(_DIMS)
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8:
            shape = [*shape, 2] if (bits * 2) % 8 == 0 else [*shape, 4]
            bits = math.prod(shape) * DTYPE_BITS[dtype]
        nbytes = bits // 8
        entry = [("dtype", dtype), ("shape", shape), ("data_offsets", [position, position + nbytes])]
        pairs.append((name, Obj(draw(st.permutations(entry)))))
        position += nbytes
    if draw(st.booleans()):
        metadata = Obj(draw(_METADATA_PAIRS))
        pairs.insert(draw(st.integers(0, len(pairs))), ("__metadata__", metadata))
    return Obj(draw(st.permutations(pairs))), position


def _entries(doc: Obj) -> list[int]:
    return [i for i, (k, v) in enumerate(doc.pairs) if k != "__metadata__" and isinstance(v, Obj)]


@st.composite
def mutated_documents(draw: st.DrawFn) -> tuple[Obj, int]:
    doc, data_size = draw(base_documents())
    for _ in range(draw(st.integers(0, 3))):
        _mutate(draw, doc)
    return doc, data_size


def _mutate(draw: st.DrawFn, doc: Obj) -> None:  # noqa: C901 (one branch per mutation kind)
    kind = draw(_KINDS)
    entries = _entries(doc)
    index = entries[draw(st.integers(0, len(entries) - 1))] if entries else None
    entry = doc.pairs[index][1] if index is not None else None
    if kind == "dup-metadata":
        doc.pairs.insert(draw(st.integers(0, len(doc.pairs))), ("__metadata__", draw(_SMALL_METADATA)))
    elif kind == "metadata-value":
        doc.pairs.append(("__metadata__", draw(_BAD_METADATA)))
    elif kind == "top-key":
        doc.pairs.insert(draw(st.integers(0, len(doc.pairs))), (draw(_NAME), draw(WEIRD)))
    elif entry is None or (not entry.pairs and kind in ("dup-field", "drop-field")):
        return
    elif kind == "dup-tensor":
        name, value = doc.pairs[index]
        copy = Obj(list(value.pairs)) if draw(st.booleans()) else draw(WEIRD)
        doc.pairs.insert(draw(st.integers(0, len(doc.pairs))), (name, copy))
    elif kind == "dup-field":
        key, value = entry.pairs[draw(st.integers(0, len(entry.pairs) - 1))]
        entry.pairs.insert(draw(st.integers(0, len(entry.pairs))), (key, value if draw(st.booleans())
                                                                      else draw(WEIRD)))
    elif kind == "drop-field":
        entry.pairs.pop(draw(st.integers(0, len(entry.pairs) - 1)))
    elif kind == "extra-field":
        entry.pairs.insert(draw(st.integers(0, len(entry.pairs))), (draw(_EXTRA_KEY), draw(WEIRD)))
    elif kind == "as-array":
        fields = dict(entry.pairs)
        array = [fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")]
        if draw(st.booleans()):
            array = array[:draw(st.integers(0, 3))] + draw(st.lists(WEIRD, max_size=1))
        doc.pairs[index] = (doc.pairs[index][0], array)
    elif kind == "dtype":
        _set_field(entry, "dtype", draw(_ANY_DTYPE))
    elif kind == "dim":
        shape = dict(entry.pairs).get("shape")
        if isinstance(shape, list):
            value = draw(_DIM_VALUE)
            if shape and draw(st.booleans()):
                shape[draw(st.integers(0, len(shape) - 1))] = value
            else:
                shape.insert(draw(st.integers(0, len(shape))), value)
    elif kind == "shape":
        _set_field(entry, "shape", draw(_SHAPE))
    elif kind == "offsets":
        offsets = dict(entry.pairs).get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
            choice = draw(_OFFSET_CHANGE)
            begin, end = offsets
            if choice == "begin":
                offsets[0] = max(0, begin + draw(st.integers(-2, 2)))
            elif choice == "end":
                offsets[1] = max(0, end + draw(st.integers(-2, 2)))
            elif choice == "swap":
                offsets.reverse()
            elif choice == "third":
                offsets.append(end)
            elif choice == "huge":
                offsets[draw(st.integers(0, 1))] = draw(_HUGE)
            else:
                offsets[draw(st.integers(0, 1))] = draw(_NUMBER)
    elif kind == "entry-value":
        doc.pairs[index] = (doc.pairs[index][0], draw(WEIRD))
    elif kind == "deep":
        entry.pairs.append(("x", _nested(draw(_DEPTH), draw(_NEST_KIND))))


def _set_field(entry: Obj, key: str, value: object) -> None:
    for i, (k, _) in enumerate(entry.pairs):
        if k == key:
            entry.pairs[i] = (k, value)
            return
    entry.pairs.append((key, value))


_BYTE_CHANGE = st.sampled_from(["replace", "insert", "delete"])
_SEPARATOR_WS = st.sampled_from(["", "", " ", "\n", "\t\r"])
_LENGTH_CHANGE = st.sampled_from(["0", "1", "-1", "+1", "+8", "limit", "2**63", "max"])
_WHITESPACE = st.sampled_from(["", "", "", " ", "\n", "\t", "\r", " \n\t\r", "\x0c", "\x00"])
_HEADER_BYTES = st.sampled_from(list(b'{}[]",:0123456789-.eE \\un\x00\x7f') + [0x80, 0xC3, 0xED, 0xFF])


@st.composite
def cases(draw: st.DrawFn) -> bytes:
    """One file's bytes: a mutated document, serialised with random whitespace, then byte-level damage."""
    doc, data_size = draw(mutated_documents())
    ws = draw(_SEPARATOR_WS)
    text = draw(_WHITESPACE) + emit(doc, ws) + draw(_WHITESPACE) + " " * draw(st.integers(0, 7))
    header = bytearray(text.encode("utf-8", "surrogatepass"))
    data = bytearray(data_size)
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 3)) == 0 else 0):
        choice = draw(_BYTE_CHANGE)
        at = draw(st.integers(0, max(0, len(header) - 1)))
        if choice == "replace" and header:
            header[at] = draw(_HEADER_BYTES)
        elif choice == "insert":
            header.insert(at, draw(_HEADER_BYTES))
        elif header:
            del header[at]
    length = len(header)
    if draw(st.integers(0, 9)) == 0:
        length = {"0": 0, "1": 1, "-1": max(0, length - 1), "+1": length + 1, "+8": length + 8,
                  "limit": 100_000_001, "2**63": 2**63, "max": 2**64 - 1}[draw(_LENGTH_CHANGE)]
    blob = struct.pack("<Q", length) + bytes(header) + bytes(data)
    if draw(st.integers(0, 9)) == 0:
        blob += bytes(draw(st.integers(1, 9)))
    if draw(st.integers(0, 9)) == 0:
        blob = blob[:draw(st.integers(0, len(blob)))]
    return blob


def reference_accepts(path: Path) -> tuple[bool, list[str], dict[str, str]]:
    """Whether ``safetensors.safe_open`` (numpy) opens ``path``, with its tensor names and metadata."""
    try:
        with safetensors.safe_open(str(path), "numpy") as handle:
            return True, sorted(handle.keys()), dict(handle.metadata() or {})
    except Exception:  # noqa: BLE001 (the reference refuses in many ways; any refusal counts)
        return False, [], {}


def classify(blob: bytes, path: Path) -> tuple[str, str]:
    """Run both readers on ``blob`` (written to ``path``); returns (class, detail)."""
    path.write_bytes(blob)
    accepted, names, metadata = reference_accepts(path)
    tracemalloc.start()
    started = time.process_time()
    try:
        header = read_header(path)
        ours, detail = True, ""
    except GptqToolsError as exc:
        ours, detail = False, str(exc)
    except Exception as exc:  # noqa: BLE001 (anything but our typed error is the bug being hunted)
        return CRASH, f"{type(exc).__name__}: {exc}"
    finally:
        elapsed = time.process_time() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if elapsed > MAX_SECONDS or peak > MAX_PEAK_BYTES:
        return SLOW, f"{elapsed:.2f} CPU s, peak {peak} bytes"
    if ours and not accepted:
        return OURS_ONLY, "reference refuses it"
    if accepted and not ours:
        return REFERENCE_ONLY, detail
    if ours and (sorted(header.tensors) != names or header.metadata != metadata):
        return OURS_ONLY, f"tensors {sorted(header.tensors)} / {names}, metadata {header.metadata} / {metadata}"
    return AGREE, ""
