"""split for publishing, reshard into valid shards, both verified; inspect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from gptq_tools.errors import OutputExistsError, UsageError
from gptq_tools.inspect_path import inspect_path
from gptq_tools.join import join_parts
from gptq_tools.manifest import parse_manifest
from gptq_tools.split import part_names, reshard_file, split_file

from .helpers import random_model_file, run_cli, sha256


def test_part_names_follow_the_seed() -> None:
    assert part_names("gptq_model-4bit--1g.safetensors", 3) == [
        f"gptq_model-4bit--1g.JOINBEFOREUSE.split-{c}.safetensors" for c in "abc"]
    assert part_names("x.bin", 27)[26] == "x.JOINBEFOREUSE.split-ba.bin"


def test_plan_shards_like_transformers() -> None:
    from gptq_tools.split import plan_shards, shard_names

    assert plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]
    assert shard_names(2) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_split_then_join_round_trip(tmp_path: Path) -> None:
    source = random_model_file(tmp_path / "model.safetensors", tensors=20)
    result = split_file(source, max_size="64KiB", output_dir=tmp_path / "parts")
    assert len(result.parts) == -(-source.stat().st_size // 65536)
    assert all(p.stat().st_size == 65536 for p in result.parts[:-1])
    manifest = parse_manifest(result.manifest)
    assert manifest["model.safetensors"] == sha256(source)
    assert all(manifest[p.name] == sha256(p) for p in result.parts)
    joined = join_parts(tmp_path / "parts")
    assert joined.verified and sha256(joined.output) == sha256(source)


def test_split_refuses_overwrite_and_pointless_split(tmp_path: Path) -> None:
    source = random_model_file(tmp_path / "model.safetensors")
    with pytest.raises(UsageError, match="already fits in one part"):
        split_file(source, max_size="1GB")
    first = split_file(source, max_size="16KiB")
    again = split_file(source, max_size="16KiB")  # the same bytes are already there: done, not "exists"
    assert again.already_done and not first.already_done and again.part_sha256 == first.part_sha256
    first.parts[1].write_bytes(b"someone else's file")
    with pytest.raises(OutputExistsError, match="split-b.safetensors: part already exists with other content; "
                                                "pass --force"):
        split_file(source, max_size="16KiB")
    assert first.parts[1].read_bytes() == b"someone else's file"


def test_reshard_makes_loadable_shards(tmp_path: Path) -> None:
    source = random_model_file(tmp_path / "model.safetensors", tensors=10, size=64)  # 16 KiB each
    result = reshard_file(source, tmp_path / "out", max_shard_size="40KB")
    assert len(result.shards) == 5
    index = json.loads(result.index.read_text())
    original = safetensors.numpy.load_file(str(source))
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in original.values())
    for name, array in original.items():
        shard = safetensors.numpy.load_file(str(tmp_path / "out" / index["weight_map"][name]))
        np.testing.assert_array_equal(shard[name], array)
    assert parse_manifest(result.manifest)[result.shards[0].name] == sha256(result.shards[0])
    assert reshard_file(source, tmp_path / "out", max_shard_size="40KB").already_done  # a rerun: done
    with pytest.raises(OutputExistsError, match="model.safetensors.index.json: already exists with other content"):
        reshard_file(source, tmp_path / "out", max_shard_size="20KB")  # another plan: the index differs


def test_reshard_is_read_by_transformers_style_loader(tmp_path: Path) -> None:
    from safetensors import safe_open

    source = random_model_file(tmp_path / "model.safetensors", tensors=4)
    result = reshard_file(source, tmp_path / "out", max_shard_size="20KB")
    for shard in result.shards:
        with safe_open(str(shard), "np") as handle:
            assert handle.metadata()["format"] == "pt"


def test_inspect_file_and_parts(tmp_path: Path) -> None:
    source = random_model_file(tmp_path / "model.safetensors")
    report = inspect_path(source, list_tensors=True)
    assert report["safetensors"]["tensors"] == 12 and report["safetensors"]["dtypes"]["F32"]["tensors"] == 12
    split_file(source, max_size="20KiB", output_dir=tmp_path / "parts")
    (tmp_path / "parts" / "model.JOINBEFOREUSE.split-b.safetensors").unlink()
    folder_report = inspect_path(tmp_path / "parts")
    assert any("missing part(s) 'b'" in p for p in folder_report["problems"])
    result = run_cli("inspect", str(tmp_path / "parts"))
    assert result.returncode == 1 and "PROBLEM:" in result.stdout and "missing part(s) 'b'" in result.stdout


def test_cli_split_and_reshard(tmp_path: Path) -> None:
    source = random_model_file(tmp_path / "model.safetensors")
    result = run_cli("split", str(source), "--max-size", "60KiB", "-o", str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr
    assert "model.JOINBEFOREUSE.split-a.safetensors" in result.stdout and "(whole file)" in result.stdout
    result = run_cli("reshard", str(source), "-o", str(tmp_path / "s"), "--max-shard-size", "50KB")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    result = run_cli("split", str(source), "--max-size", "lots")
    assert result.returncode == 2 and "--max-size: 'lots' is not a size" in result.stderr


def test_split_on_full_disk_leaves_no_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from gptq_tools.errors import InsufficientSpaceError

    source = random_model_file(tmp_path / "model.safetensors")
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def failing_pwrite(fd: int, data: object, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    with pytest.raises(InsufficientSpaceError, match="split-b.safetensors: the disk filled up"):
        split_file(source, max_size="16KiB", output_dir=tmp_path / "parts")
    assert list((tmp_path / "parts").iterdir()) == []
