"""verify: sha256sum -c compatible output and exit codes, JSON, parts without joining, structure."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from gptq_tools.errors import ManifestError, UsageError
from gptq_tools.manifest import parse_manifest, parse_manifest_text, write_manifest
from gptq_tools.verify import verify_files, verify_parts

from .helpers import random_model_file, raw_safetensors, run_cli, sha256, snapshot, split_bytes


@pytest.fixture()
def files(tmp_path: Path) -> list[Path]:
    paths = []
    for index in range(3):
        path = tmp_path / f"file{index}.bin"
        path.write_bytes(bytes([index]) * (100_000 + index))
        paths.append(path)
    return paths


def test_manifest_formats() -> None:
    h = "a" * 64
    entries = parse_manifest_text(f"# comment\n{h}  text.bin\n{h} *binary.bin\n{h} card.bin\n"
                                  f"SHA256 (bsd.bin) = {h}\n\\{h}  back\\\\slash\n")
    assert [e.name for e in entries] == ["text.bin", "binary.bin", "card.bin", "bsd.bin", "back\\slash"]


def test_manifest_refuses_conflicting_duplicates() -> None:
    with pytest.raises(ManifestError, match="line 2: x is listed twice"):
        parse_manifest_text(f"{'a' * 64}  x\n{'b' * 64}  x\n")


def test_write_manifest_is_read_by_sha256sum(tmp_path: Path, files: list[Path]) -> None:
    manifest = tmp_path / "SHA256SUMS"
    write_manifest(manifest, {p.name: sha256(p) for p in files})
    done = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.count(": OK") == 3
    write_manifest(manifest, {"extra.bin": "c" * 64})
    assert set(parse_manifest(manifest)) == {"file0.bin", "file1.bin", "file2.bin", "extra.bin"}


def test_verify_output_matches_sha256sum_c(tmp_path: Path, files: list[Path]) -> None:
    manifest = tmp_path / "SHA256SUMS"
    write_manifest(manifest, {p.name: sha256(p) for p in files})
    files[1].write_bytes(b"changed")
    ours = run_cli("verify", "-c", str(manifest), cwd=tmp_path)
    theirs = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True, text=True,
                            check=False)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stdout == theirs.stdout == "file0.bin: OK\nfile1.bin: FAILED\nfile2.bin: OK\n"
    assert "WARNING: 1 computed checksum did NOT match" in ours.stderr


def test_verify_missing_file_like_sha256sum(tmp_path: Path, files: list[Path]) -> None:
    manifest = tmp_path / "SHA256SUMS"
    write_manifest(manifest, {p.name: sha256(p) for p in files})
    files[2].unlink()
    result = run_cli("verify", "-c", str(manifest))
    assert result.returncode == 1 and "file2.bin: FAILED open or read" in result.stdout
    assert run_cli("verify", "-c", str(manifest), "--ignore-missing").returncode == 0


def test_verify_json_for_ci(tmp_path: Path, files: list[Path]) -> None:
    result = run_cli("verify", str(files[0]), "--sha256", "0" * 64, "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["ok"] is False and report["failed"] == 1
    assert report["results"][0]["actual"] == sha256(files[0])


def test_verify_files_in_parallel(tmp_path: Path, files: list[Path]) -> None:
    manifest = tmp_path / "SHA256SUMS"
    write_manifest(manifest, {p.name: sha256(p) for p in files})
    results = verify_files(manifest=manifest, workers=3)
    assert [r.status for r in results] == ["OK", "OK", "OK"]
    assert verify_files([files[0]], manifest=manifest)[0].ok


def test_verify_needs_something_to_compare(files: list[Path]) -> None:
    with pytest.raises(UsageError, match="nothing to verify against"):
        verify_files(files)
    with pytest.raises(UsageError, match="exactly one file"):
        verify_files(files, sha256="a" * 64)


def test_verify_reports_lfs_pointer(tmp_path: Path) -> None:
    pointer = tmp_path / "model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:1\nsize 1\n")
    result = verify_files([pointer], sha256="a" * 64)[0]
    assert result.status == "FAILED" and "Git LFS pointer" in result.note
    shown = run_cli("verify", "--sha256", "a" * 64, str(pointer))
    assert shown.returncode == 1 and shown.stdout == f"{pointer}: FAILED\n"
    assert "is a Git LFS pointer file, not the data" in shown.stderr


def test_verify_parts_writes_nothing(tmp_path: Path) -> None:
    source = random_model_file(tmp_path / "model.safetensors")
    parts = split_bytes(source, tmp_path / "parts", 20_000)
    before = snapshot(parts[0].parent)
    check = verify_parts(parts[0].parent, sha256=sha256(source), part_hashes=True)
    assert check.ok and check.actual == sha256(source) and check.parts == {p.name: sha256(p) for p in parts}
    assert verify_parts(parts[0].parent, sha256=sha256(source)).parts == {}
    assert snapshot(parts[0].parent) == before
    assert verify_parts(parts[0].parent).status == "UNVERIFIED"
    bad = verify_parts(parts, sha256="f" * 64)
    assert bad.status == "FAILED"
    result = run_cli("verify", "--parts", str(parts[0]), "--sha256", sha256(source))
    assert result.returncode == 0 and result.stdout == "model.safetensors: OK\n"


def test_verify_structure(tmp_path: Path) -> None:
    good = random_model_file(tmp_path / "good.safetensors")
    bad = raw_safetensors(tmp_path / "bad.safetensors", {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}},
                          bytes(3))
    result = run_cli("verify", "--structure", str(good), str(bad))
    assert result.returncode == 1
    assert "good.safetensors: OK (safetensors, 12 tensors)" in result.stdout
    assert "bad.safetensors: FAILED" in result.stdout and "1 trailing bytes" in result.stderr
