"""Every rule of the reference reader, each with its own hand-made file and message."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from gptq_tools.errors import LfsPointerError, SafetensorsFormatError
from gptq_tools.files.safetensors_format import build_header, read_header

from .helpers import raw_safetensors, write_safetensors


def test_valid_file_agrees_with_the_reference_reader(tmp_path: Path) -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.int32)}
    path = tmp_path / "ok.safetensors"
    safetensors.numpy.save_file(arrays, str(path), metadata={"format": "pt"})
    header = read_header(path)
    assert set(header.tensors) == {"a", "b"}
    assert header.metadata == {"format": "pt"}
    entry = header.tensors["a"]
    with open(path, "rb") as handle:
        handle.seek(entry.begin)
        assert np.frombuffer(handle.read(entry.nbytes), dtype=np.float32).tolist() == list(range(6))


def test_build_header_round_trips(tmp_path: Path) -> None:
    blob, offsets = build_header([("x", "F16", (2, 2)), ("y", "I32", (3,))], {"format": "pt"})
    path = tmp_path / "built.safetensors"
    path.write_bytes(blob + bytes(8 + 12))
    header = read_header(path)
    assert header.data_start % 8 == 0
    assert offsets == {"x": (0, 8), "y": (8, 20)}
    assert safetensors.numpy.load_file(str(path))["y"].tolist() == [0, 0, 0]


@pytest.mark.parametrize(("name", "build", "message"), [
    ("tiny", lambda p: p.write_bytes(b"\x01\x02"), "too short to be safetensors"),
    ("huge-header", lambda p: p.write_bytes(struct.pack("<Q", 100_000_001) + b"{}"), "over the limit of 100000000"),
    ("header-past-end", lambda p: p.write_bytes(struct.pack("<Q", 500) + b"{}"), "runs past the end"),
    ("not-json", lambda p: raw_safetensors(p, None, header_bytes=b"{not json}"), "not valid JSON"),
    ("not-utf8", lambda p: raw_safetensors(p, None, header_bytes=b'{"\xff":1}'), "not valid UTF-8"),
    ("no-brace", lambda p: raw_safetensors(p, None, header_bytes=b"[1, 2]  "), "header JSON is not an object"),
    ("gap", lambda p: raw_safetensors(p, {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                                          "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, bytes(6)),
     "gap of 2 bytes after tensor 'a'"),
    ("overlap", lambda p: raw_safetensors(p, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                                              "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, bytes(6)),
     "overlaps tensor 'a'"),
    ("not-from-zero", lambda p: raw_safetensors(p, {"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}},
                                                bytes(4)), "at the start of the data"),
    ("trailing", lambda p: raw_safetensors(p, {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}},
                                           bytes(5)), "3 trailing bytes after the last tensor"),
    ("truncated", lambda p: raw_safetensors(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                                            bytes(10)), "the file is truncated"),
    ("size-mismatch", lambda p: raw_safetensors(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},
                                                bytes(8)), "need 16"),
    ("bad-dtype", lambda p: raw_safetensors(p, {"a": {"dtype": "F17", "shape": [1], "data_offsets": [0, 1]}},
                                            bytes(1)), "unknown dtype 'F17'"),
    ("overflow", lambda p: raw_safetensors(p, {"a": {"dtype": "F32", "shape": [2**40, 2**40],
                                                     "data_offsets": [0, 1]}}, bytes(1)), "overflows"),
    ("bad-metadata", lambda p: raw_safetensors(p, {"__metadata__": {"k": 1}}), "__metadata__ must map strings"),
    # Cases where Python's json module alone would accept what the reference reader refuses:
    ("duplicate-metadata", lambda p: raw_safetensors(p, None, header_bytes=b'{"__metadata__":{},"__metadata__":{}}'),
     "__metadata__ twice"),
    ("duplicate-field", lambda p: raw_safetensors(
        p, None, header_bytes=b'{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', data=b"x"),
     "field 'dtype' appears twice"),
    ("overflow-before-zero", lambda p: raw_safetensors(
        p, {"a": {"dtype": "U8", "shape": [2**32, 2**32, 0], "data_offsets": [0, 0]}}), "overflows the byte size"),
    ("dim-2**64", lambda p: raw_safetensors(p, {"a": {"dtype": "U8", "shape": [2**64, 0], "data_offsets": [0, 0]}}),
     "not a list of non-negative integers"),
    ("dim-minus-zero", lambda p: raw_safetensors(
        p, None, header_bytes=b'{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}'),
     "not a list of non-negative integers"),
    ("lone-surrogate", lambda p: raw_safetensors(
        p, None, header_bytes=b'{"\\ud800":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'), "lone surrogate"),
    ("nan-extra-field", lambda p: raw_safetensors(
        p, None, header_bytes=b'{"a":{"dtype":"U8","x":NaN,"shape":[0],"data_offsets":[0,0]}}'), "NaN is not JSON"),
    ("infinity-extra-field", lambda p: raw_safetensors(
        p, None, header_bytes=b'{"a":{"dtype":"U8","x":-Infinity,"shape":[0],"data_offsets":[0,0]}}'),
     "-Infinity is not JSON"),
    ("deep-nesting", lambda p: raw_safetensors(
        p, None,
        header_bytes=b'{"a":{"dtype":"U8","x":' + b"[" * 126 + b"]" * 126 + b',"shape":[0],"data_offsets":[0,0]}}'),
     "nested more than 127 levels"),
    ("5000-digit-integer", lambda p: raw_safetensors(
        p, None, header_bytes=b'{"a":{"dtype":"U8","shape":[1' + b"0" * 5000 + b'],"data_offsets":[0,0]}}'),
     "number out of range"),
    ("100000-levels", lambda p: raw_safetensors(
        p, None, header_bytes=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
     "nested more than 127 levels"),
    ("list-as-dtype", lambda p: raw_safetensors(p, {"a": {"dtype": ["F32"], "shape": [0], "data_offsets": [0, 0]}}),
     r"unknown dtype \['F32'\]"),
    ("shape-as-empty-object", lambda p: raw_safetensors(
        p, None, header_bytes=b'{"a":{"dtype":"U8","shape":{},"data_offsets":[0,1]}}', data=b"x"),
     "not a list of non-negative integers"),
    ("f4-half-byte", lambda p: raw_safetensors(p, {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}},
                                               bytes(2)), "do not end on a byte boundary"),
    ("trailing-nul-padding", lambda p: raw_safetensors(p, None, header_bytes=b"{}\x00"), "not valid JSON"),
])
def test_invalid_files_are_refused_with_the_reason(tmp_path: Path, name: str, build: object, message: str) -> None:
    path = tmp_path / f"{name}.safetensors"
    build(path)  # type: ignore[operator]
    with pytest.raises(SafetensorsFormatError, match=message) as excinfo:
        read_header(path)
    assert str(path) in str(excinfo.value)
    with pytest.raises(Exception):  # noqa: B017, PT011 (the reference reader refuses it too, in its own words)
        safetensors.safe_open(str(path), "numpy")


@pytest.mark.parametrize(("name", "header", "data"), [
    ("whitespace-before-brace", b' \n\t\r{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
    ("f4", b'{"a":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]}}', bytes(3)),
    ("f6", b'{"a":{"dtype":"F6_E3M2","shape":[4],"data_offsets":[0,3]}}', bytes(3)),
    ("fnuz", b'{"a":{"dtype":"F8_E4M3FNUZ","shape":[2],"data_offsets":[0,2]}}', bytes(2)),
    ("zero-before-large-dims", b'{"a":{"dtype":"U8","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}}', b""),
    ("dim-u64-max-with-zero", b'{"a":{"dtype":"U8","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', b""),
    ("duplicate-name-last-wins", b'{"a":{"dtype":"U8","shape":[9],"data_offsets":[0,9]},'
                                 b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
    ("entry-as-array", b'{"a":["U8",[1],[0,1]]}', b"x"),
    ("dtype-as-enum-map", b'{"a":{"dtype":{"U8":null},"shape":[1],"data_offsets":[0,1]}}', b"x"),
    ("escaped-surrogate-pair", b'{"\\ud83d\\ude00":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
    ("300-digit-extra-number", b'{"a":{"dtype":"U8","x":1' + b"0" * 300 + b',"shape":[1],"data_offsets":[0,1]}}', b"x"),
])
def test_what_the_reference_accepts_is_accepted(tmp_path: Path, name: str, header: bytes, data: bytes) -> None:
    path = raw_safetensors(tmp_path / f"{name}.safetensors", None, header_bytes=header, data=data)
    with safetensors.safe_open(str(path), "numpy") as reference:
        names = sorted(reference.keys())
    assert sorted(read_header(path).tensors) == names


def test_hostile_headers_cost_little(tmp_path: Path) -> None:
    path = raw_safetensors(tmp_path / "deep.safetensors", None, header_bytes=b"[" * 10_000_000)
    started = time.perf_counter()
    with pytest.raises(SafetensorsFormatError, match="nested more than 127 levels"):
        read_header(path)
    assert time.perf_counter() - started < 2.0


def test_lfs_pointer_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(LfsPointerError, match="Git LFS pointer"):
        read_header(path)


def test_header_padding_with_spaces_is_accepted(tmp_path: Path) -> None:
    header = json.dumps({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    path = raw_safetensors(tmp_path / "p.safetensors", None, header_bytes=header + b"     ", data=b"\x07")
    assert read_header(path).tensors["a"].nbytes == 1


def test_writer_helper_makes_valid_files(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "w.safetensors", {"q": np.zeros((4, 2), dtype=np.int32)})
    assert read_header(path).tensors["q"].shape == (4, 2)
