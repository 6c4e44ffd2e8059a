"""Swapped parts are named for every pair (the first part too) when the part hashes are known."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from gptq_tools.errors import ChecksumMismatchError, PartSetError
from gptq_tools.files.join import join_parts, misplaced_parts
from gptq_tools.files.verify import verify_parts

from .helpers import sha256, snapshot, split_bytes, write_safetensors

NAMES = [f"m.JOINBEFOREUSE.split-{c}.safetensors" for c in "abc"]


def _parts(tmp_path: Path) -> tuple[Path, list[Path]]:
    (tmp_path / "src").mkdir()
    rng = np.random.default_rng(0)
    tensors = {f"layer.{i}.weight": rng.standard_normal((48, 48)).astype(np.float32) for i in range(6)}
    for pad in range(3):  # three parts of equal size, so that any two can trade places
        model = write_safetensors(tmp_path / "src" / "m.safetensors", tensors, {"pad": "x" * pad})
        if model.stat().st_size % 3 == 0:
            break
    parts = split_bytes(model, tmp_path / "parts", model.stat().st_size // 3, names=NAMES)
    assert len({p.stat().st_size for p in parts}) == 1
    return model, parts


def _manifest(model: Path, parts: list[Path]) -> Path:
    manifest = parts[0].parent / "SHA256SUMS"
    manifest.write_text("".join(f"{sha256(p)}  {p.name}\n" for p in parts) + f"{sha256(model)}  m.safetensors\n")
    return manifest


@pytest.mark.parametrize(("first", "second"), list(itertools.combinations(range(3), 2)))
def test_every_swapped_pair_is_named(tmp_path: Path, first: int, second: int) -> None:
    model, parts = _parts(tmp_path)
    manifest = _manifest(model, parts)
    one, two = parts[first].read_bytes(), parts[second].read_bytes()
    parts[first].write_bytes(two)
    parts[second].write_bytes(one)
    before = snapshot(parts[0].parent)
    named = f"parts {NAMES[first]} and {NAMES[second]} are swapped"
    with pytest.raises(ChecksumMismatchError, match=named):
        join_parts(parts, manifest=manifest)
    with pytest.raises(ChecksumMismatchError, match=named):
        verify_parts(parts, manifest=manifest)
    assert snapshot(parts[0].parent) == before  # nothing written


def test_without_part_hashes_the_structure_error_stays(tmp_path: Path) -> None:
    model, parts = _parts(tmp_path)
    one, two = parts[0].read_bytes(), parts[1].read_bytes()
    parts[0].write_bytes(two)
    parts[1].write_bytes(one)
    with pytest.raises(PartSetError, match="really the first part"):
        join_parts(parts, expected_sha256=sha256(model))


def test_misplaced_parts_wording() -> None:
    expected = {"a": "1", "b": "2", "c": "3"}
    assert misplaced_parts(expected, {"a": "2", "b": "1", "c": "3"}) == "parts a and b are swapped"
    assert misplaced_parts(expected, {"a": "3", "b": "2", "c": "1"}) == "parts a and c are swapped"
    assert misplaced_parts(expected, {"a": "2", "b": "3", "c": "1"}) == (
        "parts are out of order: a holds b, b holds c, c holds a")
    assert misplaced_parts(expected, {"a": "9", "b": "1", "c": "3"}) == ""  # a is corrupt, not misplaced
    assert misplaced_parts(expected, dict(expected)) == ""
