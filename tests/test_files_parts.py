"""Finding, ordering and checking part sets; reading them as one file."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gptq_tools.errors import LfsPointerError, PartSetError
from gptq_tools.files.parts import MultiPartReader, check_safetensors_parts, find_part_set, parse_part_name

from .helpers import random_model_file, split_bytes


def touch(folder: Path, *names: str, size: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x" * size)


@pytest.mark.parametrize(("name", "output"), [
    ("gptq_model-4bit--1g.JOINBEFOREUSE.split-a.safetensors", "gptq_model-4bit--1g.safetensors"),
    ("model.safetensors.split-aa", "model.safetensors"),
    ("model.split_b.bin", "model.bin"),
    ("model.safetensors.001", "model.safetensors"),
    ("model.part2of3.safetensors", "model.safetensors"),
    ("model.safetensors.part1of2", "model.safetensors"),
])
def test_part_names(name: str, output: str) -> None:
    parsed = parse_part_name(name)
    assert parsed is not None and parsed.output_name == output


def test_plain_names_are_not_parts() -> None:
    assert parse_part_name("config.json") is None
    assert parse_part_name("model-00001-of-00002.safetensors") is None


def test_seed_style_set_is_found_from_folder_or_any_part(tmp_path: Path) -> None:
    names = [f"gptq_model-4bit--1g.JOINBEFOREUSE.split-{c}.safetensors" for c in "cab"]
    touch(tmp_path, *names, "config.json", "quantize_config.json")
    for start in (tmp_path, tmp_path / names[0]):
        part_set = find_part_set(start)
        assert part_set.output_name == "gptq_model-4bit--1g.safetensors"
        assert [p.name[-13] for p in part_set.parts] == ["a", "b", "c"]
        assert part_set.total_size == 12


def test_gnu_auto_widening_suffixes_order(tmp_path: Path) -> None:
    suffixes = ["yy", "yz", "zaaa", "zaab"]
    touch(tmp_path, *(f"m.bin.split-{s}" for s in suffixes))
    with pytest.raises(PartSetError, match="missing part"):
        find_part_set(tmp_path)  # aa..yx are missing: the set starts at 'aa'


def test_numeric_sets_start_at_zero_or_one(tmp_path: Path) -> None:
    touch(tmp_path / "one", "m.safetensors.001", "m.safetensors.002")
    touch(tmp_path / "zero", "m.safetensors.000", "m.safetensors.001")
    assert [p.name for p in find_part_set(tmp_path / "one").parts] == ["m.safetensors.001", "m.safetensors.002"]
    assert [p.name for p in find_part_set(tmp_path / "zero").parts][0] == "m.safetensors.000"


def test_gap_names_the_missing_part(tmp_path: Path) -> None:
    touch(tmp_path, "m.JOINBEFOREUSE.split-a.safetensors", "m.JOINBEFOREUSE.split-c.safetensors")
    with pytest.raises(PartSetError, match="missing part\\(s\\) 'b'"):
        find_part_set(tmp_path)


def test_partof_knows_the_count(tmp_path: Path) -> None:
    touch(tmp_path, "m.part1of3.safetensors", "m.part2of3.safetensors")
    with pytest.raises(PartSetError, match="missing part\\(s\\) '3'"):
        find_part_set(tmp_path)


def test_duplicate_position_is_refused(tmp_path: Path) -> None:
    touch(tmp_path, "m.safetensors.001", "m.safetensors.0001", "m.safetensors.002")
    with pytest.raises(PartSetError, match="duplicate parts .*m.safetensors.0001 and m.safetensors.001"):
        find_part_set(tmp_path)


def test_several_sets_are_ambiguous(tmp_path: Path) -> None:
    touch(tmp_path, "a.split-a.bin", "a.split-b.bin", "b.safetensors.001")
    with pytest.raises(PartSetError, match="several part sets found .*a.bin .*b.safetensors"):
        find_part_set(tmp_path)
    assert find_part_set(tmp_path / "a.split-b.bin").output_name == "a.bin"


def test_stray_member_named_differently(tmp_path: Path) -> None:
    touch(tmp_path, "m.JOINBEFOREUSE.split-a.safetensors", "m.JOINBEFOREUSE.split-b.safetensors",
          "m.safetensors.003")
    with pytest.raises(PartSetError, match="m.safetensors.003 looks like a part of m.safetensors"):
        find_part_set(tmp_path / "m.JOINBEFOREUSE.split-a.safetensors")


def test_empty_folder(tmp_path: Path) -> None:
    touch(tmp_path, "config.json")
    with pytest.raises(PartSetError, match="no split parts found"):
        find_part_set(tmp_path)


def test_lfs_pointer_part(tmp_path: Path) -> None:
    touch(tmp_path, "m.JOINBEFOREUSE.split-a.safetensors")
    (tmp_path / "m.JOINBEFOREUSE.split-b.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 5\n")
    with pytest.raises(LfsPointerError, match="split-b.safetensors: this is a Git LFS pointer"):
        find_part_set(tmp_path)


def test_multipart_reader_reads_and_seeks_across_parts(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    source = tmp_path / "blob.bin"
    source.write_bytes(data)
    parts = split_bytes(source, tmp_path / "parts", 1000)
    with MultiPartReader(parts) as reader:
        assert reader.size == len(data)
        assert reader.read() == data
        reader.seek(995)
        assert reader.read(10) == data[995:1005]
        reader.seek(-3, io.SEEK_END)
        assert reader.read(100) == data[-3:]
        buffered = io.BufferedReader(reader)
        buffered.seek(2999)
        assert buffered.read(2) == data[2999:3001]


def _model_parts(tmp_path: Path) -> list[Path]:
    source = random_model_file(tmp_path / "model.safetensors")
    return split_bytes(source, tmp_path / "parts", (source.stat().st_size + 2) // 3)


def test_header_check_catches_truncated_middle_part(tmp_path: Path) -> None:
    parts = _model_parts(tmp_path)
    parts[1].write_bytes(parts[1].read_bytes()[:-100])
    with pytest.raises(PartSetError, match="split-b.safetensors: part is truncated"):
        check_safetensors_parts(find_part_set(parts[0]))


def test_header_check_catches_missing_last_part(tmp_path: Path) -> None:
    parts = _model_parts(tmp_path)
    parts[2].unlink()
    with pytest.raises(PartSetError, match="last part looks truncated or the next part is missing"):
        check_safetensors_parts(find_part_set(parts[0]))


def test_header_check_catches_extra_part(tmp_path: Path) -> None:
    parts = _model_parts(tmp_path)
    (parts[0].parent / "model.JOINBEFOREUSE.split-d.safetensors").write_bytes(b"extra bytes")
    with pytest.raises(PartSetError, match="extra part\\(s\\) model.JOINBEFOREUSE.split-d.safetensors"):
        check_safetensors_parts(find_part_set(parts[0]))


def test_header_check_catches_wrong_first_part(tmp_path: Path) -> None:
    parts = _model_parts(tmp_path)
    a, b = parts[0].read_bytes(), parts[1].read_bytes()
    parts[0].write_bytes(b)
    parts[1].write_bytes(a)
    with pytest.raises(PartSetError, match="really the first part"):
        check_safetensors_parts(find_part_set(parts[0]))
