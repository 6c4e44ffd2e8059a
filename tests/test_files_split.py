"""split for publishing, reshard into valid shards, both verified; inspect."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from gptq_tools.checkpoint.inspect import inspect_path
from gptq_tools.errors import OutputExistsError, UsageError
from gptq_tools.files.join import join_parts
from gptq_tools.files.manifest import parse_manifest
from gptq_tools.files.split import part_names, reshard_file, split_file

from .helpers import random_model_file, run_cli, sha256


def test_part_names_follow_the_seed() -> None:
    assert part_names("gptq_model-4bit--1g.safetensors", 3) == [
        f"gptq_model-4bit--1g.JOINBEFOREUSE.split-{c}.safetensors" for c in "abc"]
    assert part_names("x.bin", 27)[26] == "x.JOINBEFOREUSE.split-ba.bin"


def test_plan_shards_like_transformers() -> None:
    from gptq_tools.files.split import plan_shards, shard_names

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


@pytest.mark.parametrize("command", ["split", "reshard"])
def test_missing_input_is_one_line(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "nope.safetensors"
    extra = ["--max-size", "1KiB"] if command == "split" else []
    result = run_cli(command, str(missing), *extra)
    assert result.returncode == 1
    what = "the file to split" if command == "split" else "the safetensors file to reshard"
    assert result.stderr == f"gptq-tools: error: {missing}: no such file; give {what}\n"
    assert list(tmp_path.iterdir()) == []


def test_reshard_into_its_own_folder_does_not_replace_the_source_without_force(tmp_path: Path) -> None:
    source = random_model_file(tmp_path / "model-00001-of-00001.safetensors", tensors=4)
    original = source.read_bytes()
    result = run_cli("reshard", str(source), "--max-shard-size", "1GB")  # default folder: beside the source
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr == (f"gptq-tools: error: {source}: is the source being resharded; choose another folder "
                             f"(-o), or pass --force to replace it (the source is read completely first)\n")
    assert source.read_bytes() == original and sorted(p.name for p in tmp_path.iterdir()) == [source.name]
    tensors = safetensors.numpy.load_file(str(source))
    forced = reshard_file(source, tmp_path, max_shard_size="1GB", force=True)
    assert forced.shards == (source,)
    resharded = safetensors.numpy.load_file(str(source))
    assert resharded.keys() == tensors.keys()
    assert all(np.array_equal(resharded[k], tensors[k]) for k in tensors)


def test_reshard_refuses_a_foreign_shard(tmp_path: Path) -> None:
    source = random_model_file(tmp_path / "model.safetensors", tensors=8, size=64)  # 16 KiB tensors
    out = tmp_path / "out"
    out.mkdir()
    foreign = out / "model-00002-of-00004.safetensors"
    foreign.write_bytes(b"another model's shard")
    result = run_cli("reshard", str(source), "-o", str(out), "--max-shard-size", "40KB")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr == (f"gptq-tools: error: {foreign}: already exists with other content; pass --force to "
                             f"overwrite it or choose another folder (-o)\n")
    assert sorted(p.name for p in out.iterdir()) == [foreign.name] and foreign.read_bytes() == b"another model's shard"
    assert len(reshard_file(source, out, max_shard_size="40KB", force=True).shards) == 4
    assert foreign.read_bytes() != b"another model's shard"


def test_reshard_removes_work_folders_of_killed_runs(tmp_path: Path) -> None:
    source = random_model_file(tmp_path / "model.safetensors", tensors=4)
    stale = tmp_path / "out" / ".gptq-tools-tmp-reshard.999999999.abcd"  # no such process
    stale.mkdir(parents=True)
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    mine = tmp_path / "out" / f".gptq-tools-tmp-reshard.{os.getpid()}.efgh"  # a live process: left alone
    mine.mkdir()
    reshard_file(source, tmp_path / "out", max_shard_size="20KB")
    assert not stale.exists() and mine.exists()


def _fail_fsync_of(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """ENOSPC from fsync of the file being written for ``name`` (what a full disk does to a small write)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith((name, f".gptq-tools-tmp-{name}.")):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_while_writing_split_sha256sums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from gptq_tools.cli import main as cli_main

    source = random_model_file(tmp_path / "model.safetensors")
    before = sha256(source)
    _fail_fsync_of(monkeypatch, "SHA256SUMS")
    code = cli_main(["split", str(source), "--max-size", "16KiB", "-o", str(tmp_path / "parts")])
    assert code == 1
    assert capsys.readouterr().err == (f"gptq-tools: error: {tmp_path / 'parts' / 'SHA256SUMS'}: the disk filled up "
                                       f"while writing; nothing was written at the final name. Free some space or "
                                       f"choose another output folder\n")
    assert list((tmp_path / "parts").iterdir()) == [] and sha256(source) == before  # no part published either


def test_full_disk_while_writing_the_shard_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from gptq_tools.cli import main as cli_main

    source = random_model_file(tmp_path / "model.safetensors")
    out = tmp_path / "out"
    _fail_fsync_of(monkeypatch, "model.safetensors.index.json")
    code = cli_main(["reshard", str(source), "-o", str(out), "--max-shard-size", "20KB"])
    assert code == 1
    assert capsys.readouterr().err.startswith(f"gptq-tools: error: {out / 'model.safetensors.index.json'}: the disk "
                                              f"filled up while writing; nothing was written at the final name")
    assert list(out.iterdir()) == []  # no shard, no index, no work folder


def test_real_full_disk_while_resharding(tmp_path: Path) -> None:
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount_point)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        source = random_model_file(tmp_path / "model.safetensors", tensors=4, size=64)  # 64 KiB: two copies do not fit
        (mount_point / "filler").write_bytes(b"\0" * 40 * 1024)
        result = run_cli("reshard", str(source), "-o", str(mount_point), "--max-shard-size", "20KB")
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "free some space or choose another output folder" in result.stderr.lower()
        assert sorted(p.name for p in mount_point.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_published_files_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    source = random_model_file(tmp_path / "model.safetensors")
    previous = os.umask(umask)
    try:
        split = split_file(source, max_size="16KiB", output_dir=tmp_path / "parts")
        reshard = reshard_file(source, tmp_path / "shards", max_shard_size="20KB")
    finally:
        os.umask(previous)
    published = [*split.parts, split.manifest, *reshard.shards, reshard.index, reshard.manifest]
    assert {p.name: p.stat().st_mode & 0o777 for p in published} == {p.name: mode for p in published}


@pytest.mark.parametrize("command", ["split", "reshard"])
def test_read_only_destination_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], command: str) -> None:
    import tempfile

    from gptq_tools.cli import main as cli_main

    source = random_model_file(tmp_path / "model.safetensors")
    (tmp_path / "ro").mkdir()

    def read_only(*args: object, **kwargs: object) -> object:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    extra = ["--max-size", "16KiB"] if command == "split" else ["--max-shard-size", "20KB"]
    assert cli_main([command, str(source), "-o", str(tmp_path / "ro"), *extra]) == 1
    err = capsys.readouterr().err
    named = "SHA256SUMS" if command == "split" else "model.safetensors.index.json"
    assert err == (f"gptq-tools: error: {tmp_path / 'ro' / named}: cannot write the output here (the filesystem is "
                   f"read-only); choose another output folder or make {tmp_path / 'ro'} writable\n")
    assert list((tmp_path / "ro").iterdir()) == []
