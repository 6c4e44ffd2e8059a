"""verify: sha256sum -c compatible output and exit codes, JSON, parts without joining, structure."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from xml.etree import ElementTree

import pytest

from gptq_tools.errors import ManifestError, UsageError
from gptq_tools.files.manifest import parse_manifest, parse_manifest_text, write_manifest
from gptq_tools.files.verify import verify_files, verify_parts

from .helpers import REPO_ROOT, random_model_file, raw_safetensors, run_cli, sha256, snapshot, split_bytes


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
    junit = tmp_path / "structure.xml"
    assert run_cli("verify", "--structure", str(good), str(bad), "--junit", str(junit)).returncode == 1
    root = ElementTree.parse(junit).getroot()
    assert (root.get("tests"), root.get("failures")) == ("2", "1")


# -- issue 8's manifest cases: each one clear line, nothing read without bound -------------------------------
def test_manifest_that_is_a_folder(tmp_path: Path, files: list[Path]) -> None:
    write_manifest(tmp_path / "SHA256SUMS", {p.name: sha256(p) for p in files})
    result = run_cli("verify", "-c", str(tmp_path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"gptq-tools: error: {tmp_path}: is a folder, not a checksum list; "
                             f"give -c {tmp_path / 'SHA256SUMS'}\n")


def test_manifest_that_is_a_device() -> None:
    result = run_cli("verify", "-c", "/dev/zero")
    assert result.returncode == 1
    assert result.stderr == ("gptq-tools: error: /dev/zero: is a device or socket, not a checksum list; give a "
                             "SHA256SUMS file (or - for standard input)\n")


def test_manifest_too_large_is_refused_unread(tmp_path: Path) -> None:
    huge = tmp_path / "SHA256SUMS"
    with open(huge, "wb") as handle:
        handle.truncate(64 * 1024 * 1024 + 1)  # sparse: nothing is written, and nothing must be read
    result = run_cli("verify", "-c", str(huge))
    assert result.returncode == 1
    assert result.stderr == (f"gptq-tools: error: {huge}: 67108865 bytes is too large for a checksum list (at most "
                             f"67108864); is it really a SHA256SUMS file?\n")


def test_endless_stdin_manifest_is_bounded(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GPTQ_TOOLS_DISABLE_PROGRESS": "1"}
    with open("/dev/zero", "rb") as zeros:
        done = subprocess.run([sys.executable, "-m", "gptq_tools", "verify", "-c", "-"], stdin=zeros, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr == ("gptq-tools: error: standard input: more than 67108864 bytes is too large for a checksum "
                           "list; is it really a SHA256SUMS file?\n")


def test_manifest_from_a_fifo(tmp_path: Path, files: list[Path]) -> None:
    fifo = tmp_path / "sums.fifo"
    os.mkfifo(fifo)
    text = f"{sha256(files[0])}  {files[0].name}\n".encode()
    writer = threading.Thread(target=fifo.write_bytes, args=(text,), daemon=True)
    writer.start()
    result = run_cli("verify", "-c", str(fifo))
    writer.join(timeout=10)
    assert result.returncode == 0 and result.stdout == "file0.bin: OK\n"


def test_nul_byte_in_a_name(tmp_path: Path, files: list[Path]) -> None:
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_bytes(f"{sha256(files[0])}  file0.bin\x00.evil\n{sha256(files[1])}  file1.bin\n".encode())
    result = run_cli("verify", "-c", str(manifest))
    assert result.returncode == 0 and result.stdout == "file1.bin: OK\n"
    assert result.stderr == (f"gptq-tools: {manifest}: 1: a file name holds a NUL byte, which no file name can; "
                             f"line skipped\ngptq-tools: WARNING: 1 line is improperly formatted\n")
    assert run_cli("verify", "-c", "--strict", str(manifest)).returncode == 1


def test_names_outside_the_manifest_folder(tmp_path: Path, files: list[Path]) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    manifest = inner / "SHA256SUMS"
    manifest.write_text(f"{sha256(files[0])}  ../file0.bin\n{sha256(files[1])}  {files[1]}\n")
    result = run_cli("verify", "-c", str(manifest))
    assert result.returncode == 1
    assert result.stdout == f"../file0.bin: FAILED open or read\n{files[1]}: FAILED open or read\n"
    assert result.stderr == ("gptq-tools: ../file0.bin: refusing a path with '..': names in a manifest stay inside "
                             f"its folder\ngptq-tools: {files[1]}: refusing an absolute path: names in a manifest "
                             "stay inside its folder\ngptq-tools: WARNING: 2 listed files could not be read\n")


def test_each_failure_is_printed_once(tmp_path: Path, files: list[Path]) -> None:
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text(f"{'0' * 64}  file0.bin\n{sha256(files[1])}  gone.bin\n")
    result = run_cli("verify", "-c", str(manifest))
    assert result.stdout == "file0.bin: FAILED\ngone.bin: FAILED open or read\n"
    assert result.stderr == ("gptq-tools: gone.bin: No such file or directory\n"
                             "gptq-tools: WARNING: 1 listed file could not be read\n"
                             "gptq-tools: WARNING: 1 computed checksum did NOT match\n")


def test_json_checks_the_rest_after_malformed_lines(tmp_path: Path, files: list[Path]) -> None:
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text(f"not a checksum line\n{sha256(files[0])}  file0.bin\n{'0' * 64}  file1.bin\n")
    result = run_cli("verify", "-c", "--json", str(manifest))
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["ok"] is False and report["failed"] == 1
    assert [r["status"] for r in report["results"]] == ["OK", "FAILED"]
    assert report["manifests"][0]["malformed"] == [{"line": 1, "reason": "improperly formatted SHA256 checksum line"}]
    assert result.stderr == ("gptq-tools: WARNING: 1 line is improperly formatted\n"
                             "gptq-tools: WARNING: 1 computed checksum did NOT match\n")


def test_check_options_need_a_check(files: list[Path]) -> None:
    result = run_cli("verify", "--quiet", str(files[0]))
    assert result.returncode == 2
    assert result.stderr == ("gptq-tools: error: the --quiet option is meaningful only when verifying checksums "
                             "(-c, --manifest, --remote or --sha256)\n")


def test_junit_report(tmp_path: Path, files: list[Path]) -> None:
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text(f"{sha256(files[0])}  file0.bin\n{'0' * 64}  file1.bin\n{sha256(files[2])}  gone.bin\n"
                        "garbage\n")
    junit = tmp_path / "reports" / "verify.xml"
    junit.parent.mkdir()
    result = run_cli("verify", "-c", "--strict", str(manifest), "--junit", str(junit))
    assert result.returncode == 1
    root = ElementTree.parse(junit).getroot()
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == str(manifest)
    assert (root.get("tests"), root.get("failures"), suite.get("tests"), suite.get("failures")) == ("4", "3", "4", "3")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert set(cases) == {"file0.bin", "file1.bin", "gone.bin", f"{manifest} line 4"}
    assert cases["file0.bin"].find("failure") is None
    assert cases["file1.bin"].find("failure").get("message") == "computed checksum did NOT match"  # type: ignore[union-attr]
    assert "No such file or directory" in cases["gone.bin"].find("failure").get("message")  # type: ignore[union-attr]
    assert sorted(p.name for p in junit.parent.iterdir()) == ["verify.xml"]  # written atomically, no temporary left
    hashed = run_cli("verify", str(files[0]), "--junit", str(junit))
    assert hashed.returncode == 0 and hashed.stdout == f"{sha256(files[0])}  {files[0]}\n"
    root = ElementTree.parse(junit).getroot()
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("1", "0", "1")


def test_hash_mode_escapes_like_sha256sum(tmp_path: Path) -> None:
    odd = tmp_path / "a\\b"
    odd.write_bytes(b"x")
    result = run_cli("verify", str(odd), str(tmp_path / "gone"))
    assert result.returncode == 1
    assert result.stdout == f"\\{sha256(odd)}  {str(odd).replace(chr(92), chr(92) * 2)}\n"
    assert result.stderr == f"gptq-tools: {tmp_path / 'gone'}: No such file or directory\n"


def test_fifo_entry_is_read_not_sized(tmp_path: Path) -> None:
    fifo = tmp_path / "stream"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(b"streamed bytes",), daemon=True)
    writer.start()
    results = verify_files([fifo], sha256=hashlib.sha256(b"streamed bytes").hexdigest())
    writer.join(timeout=10)
    assert [r.status for r in results] == ["OK"]


def test_names_written_from_the_current_folder(tmp_path: Path, files: list[Path]) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "x.bin").write_bytes(b"x")
    (sub / "SUMS").write_text(f"{hashlib.sha256(b'x').hexdigest()}  sub/x.bin\n"
                              f"{hashlib.sha256(b'x').hexdigest()}  x.bin\n")
    ours = run_cli("verify", "-c", "sub/SUMS", cwd=tmp_path)  # `sha256sum sub/* > sub/SUMS` style, and bare names
    assert ours.returncode == 0 and ours.stdout == "sub/x.bin: OK\nx.bin: OK\n"
