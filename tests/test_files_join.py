"""join: one pass, verified, atomic; every bad input refused with the file named and nothing lost."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptq_tools.errors import (
    ChecksumMismatchError,
    InsufficientSpaceError,
    LfsPointerError,
    ManifestError,
    OutputExistsError,
    PartSetError,
    UsageError,
)
from gptq_tools.files.join import join_parts

from .helpers import REPO_ROOT, random_model_file, run_cli, sha256, snapshot, split_bytes


@pytest.fixture()
def model_parts(tmp_path: Path) -> tuple[Path, list[Path]]:
    source = random_model_file(tmp_path / "src" / "model.safetensors") if (tmp_path / "src").mkdir() is None else None
    assert source is not None
    parts = split_bytes(source, tmp_path / "parts", (source.stat().st_size + 2) // 3)
    return source, parts


def assert_no_output(folder: Path, name: str = "model.safetensors") -> None:
    assert not (folder / name).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".gptq-tools-tmp-")]


@pytest.mark.parametrize("method", ["auto", "readwrite", "copy_file_range"])
def test_join_verified_from_folder(model_parts: tuple[Path, list[Path]], method: str) -> None:
    source, parts = model_parts
    result = join_parts(parts[0].parent, expected_sha256=sha256(source), method=method)
    assert result.verified and result.output == parts[0].parent / "model.safetensors"
    assert result.output.read_bytes() == source.read_bytes()
    assert result.part_sha256 == {p.name: sha256(p) for p in parts}
    assert result.method in ("reflink", "readwrite", "copy_file_range")


def test_join_without_hash_reports_and_says_unverified(model_parts: tuple[Path, list[Path]],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    source, parts = model_parts
    result = join_parts(parts, parts[0].parent.parent / "out.safetensors")
    assert not result.verified and result.sha256 == sha256(source)
    assert "NOT verified" in caplog.text


def test_flipped_bit_is_caught_and_nothing_written(model_parts: tuple[Path, list[Path]]) -> None:
    source, parts = model_parts
    data = bytearray(parts[1].read_bytes())
    data[1234] ^= 0x01
    parts[1].write_bytes(bytes(data))
    before = snapshot(parts[0].parent)
    with pytest.raises(ChecksumMismatchError, match=f"model.safetensors: SHA256 mismatch \\(expected {sha256(source)}"):
        join_parts(parts, expected_sha256=sha256(source))
    assert snapshot(parts[0].parent) == before
    assert_no_output(parts[0].parent)


def test_swapped_parts_of_equal_size_named_via_manifest(tmp_path: Path) -> None:
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(3000))
    parts = split_bytes(source, tmp_path / "parts", 1000, names=["blob.bin.001", "blob.bin.002", "blob.bin.003"])
    manifest = tmp_path / "parts" / "SHA256SUMS"
    manifest.write_text("".join(f"{sha256(p)}  {p.name}\n" for p in parts) + f"{sha256(source)}  blob.bin\n")
    first, second = parts[0].read_bytes(), parts[1].read_bytes()
    parts[0].write_bytes(second)
    parts[1].write_bytes(first)
    with pytest.raises(ChecksumMismatchError, match="parts blob.bin.001 and blob.bin.002 are swapped"):
        join_parts(parts, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_swapped_contents_without_manifest_fail_on_whole_hash(tmp_path: Path) -> None:
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(3000))
    parts = split_bytes(source, tmp_path / "parts", 1000, names=["blob.bin.001", "blob.bin.002", "blob.bin.003"])
    first, second = parts[0].read_bytes(), parts[1].read_bytes()
    parts[0].write_bytes(second)
    parts[1].write_bytes(first)
    with pytest.raises(ChecksumMismatchError, match="wrong order"):
        join_parts(parts, tmp_path / "out.bin", expected_sha256=sha256(source))


def test_parts_given_out_of_name_order(tmp_path: Path) -> None:
    source = tmp_path / "blob.bin"
    source.write_bytes(os.urandom(3000))
    parts = split_bytes(source, tmp_path / "parts", 1000, names=["blob.bin.001", "blob.bin.002", "blob.bin.003"])
    with pytest.raises(PartSetError, match="parts given out of order \\(blob.bin.002, blob.bin.001, blob.bin.003\\)"):
        join_parts([parts[1], parts[0], parts[2]], tmp_path / "out.bin", expected_sha256=sha256(source))


def test_wrong_expected_hash(model_parts: tuple[Path, list[Path]]) -> None:
    _, parts = model_parts
    with pytest.raises(ChecksumMismatchError, match="expected " + "0" * 64):
        join_parts(parts, expected_sha256="0" * 64)
    assert_no_output(parts[0].parent)


def test_malformed_expected_hash(model_parts: tuple[Path, list[Path]]) -> None:
    with pytest.raises(UsageError, match="not a SHA256"):
        join_parts(model_parts[1], expected_sha256="abc")


def test_truncated_part(model_parts: tuple[Path, list[Path]]) -> None:
    _, parts = model_parts
    parts[1].write_bytes(parts[1].read_bytes()[:-7])
    with pytest.raises(PartSetError, match="split-b.safetensors: part is truncated"):
        join_parts(parts[0].parent)
    assert_no_output(parts[0].parent)


def test_missing_part(model_parts: tuple[Path, list[Path]]) -> None:
    _, parts = model_parts
    parts[1].unlink()
    with pytest.raises(PartSetError, match="missing part\\(s\\) 'b'"):
        join_parts(parts[0].parent)


def test_extra_part(model_parts: tuple[Path, list[Path]]) -> None:
    _, parts = model_parts
    (parts[0].parent / "model.JOINBEFOREUSE.split-d.safetensors").write_bytes(b"junk")
    with pytest.raises(PartSetError, match="extra part\\(s\\) model.JOINBEFOREUSE.split-d"):
        join_parts(parts[0].parent)
    assert_no_output(parts[0].parent)


def test_lfs_pointer_in_place_of_a_part(model_parts: tuple[Path, list[Path]]) -> None:
    _, parts = model_parts
    parts[2].write_text("version https://git-lfs.github.com/spec/v1\noid sha256:1\nsize 1\n")
    with pytest.raises(LfsPointerError, match="split-c.safetensors: this is a Git LFS pointer file"):
        join_parts(parts[0].parent)


def test_output_exists_needs_force(model_parts: tuple[Path, list[Path]]) -> None:
    source, parts = model_parts
    existing = parts[0].parent / "model.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match=r"already exists and, with no expected hash, cannot be told from a "
                                                r"good join \(pass --sha256 HEX or --manifest SHA256SUMS to check it "
                                                r"and keep it\); pass --force to overwrite it"):
        join_parts(parts[0].parent)
    assert existing.read_bytes() == b"keep me"
    join_parts(parts[0].parent, force=True, expected_sha256=sha256(source))
    assert sha256(existing) == sha256(source)


def test_output_may_not_be_a_part(model_parts: tuple[Path, list[Path]]) -> None:
    _, parts = model_parts
    with pytest.raises(UsageError, match="would overwrite part"):
        join_parts(parts, parts[2], force=True)
    assert parts[2].stat().st_size > 0


def test_delete_parts_only_after_verification(model_parts: tuple[Path, list[Path]]) -> None:
    source, parts = model_parts
    with pytest.raises(UsageError, match="--delete-parts needs an expected hash"):
        join_parts(parts, delete_parts=True)
    assert all(p.exists() for p in parts)
    with pytest.raises(ChecksumMismatchError):
        join_parts(parts, delete_parts=True, expected_sha256="1" * 64)
    assert all(p.exists() for p in parts)
    result = join_parts(parts, delete_parts=True, expected_sha256=sha256(source))
    assert result.deleted_parts and not any(p.exists() for p in parts)


@pytest.mark.parametrize(("line", "message"), [
    ("{h}  ../model.safetensors", "refusing path '../model.safetensors'"),
    ("{h}  /etc/model.safetensors", "refusing path '/etc/model.safetensors'"),
    ("this is not a checksum line", "line 1: cannot parse"),
])
def test_bad_manifests(model_parts: tuple[Path, list[Path]], line: str, message: str) -> None:
    source, parts = model_parts
    manifest = parts[0].parent.parent / "SUMS"
    manifest.write_text(line.format(h=sha256(source)) + "\n")
    with pytest.raises(ManifestError, match=message):
        join_parts(parts, manifest=manifest)
    assert_no_output(parts[0].parent)


def test_model_card_single_space_manifest_and_auto_sha256sums(model_parts: tuple[Path, list[Path]]) -> None:
    source, parts = model_parts
    (parts[0].parent / "SHA256SUMS").write_text(f"{sha256(source)} model.safetensors\n")
    result = join_parts(parts[0].parent)
    assert result.verified and result.expected_source.endswith("SHA256SUMS")


def test_copy_file_range_refused_falls_back_to_writing(model_parts: tuple[Path, list[Path]],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    source, parts = model_parts

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    result = join_parts(parts, expected_sha256=sha256(source))
    assert result.method == "copy_file_range" and sha256(result.output) == sha256(source)


def test_injected_enospc_leaves_nothing(model_parts: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    source, parts = model_parts
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def failing_pwrite(fd: int, data: object, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    from gptq_tools.files import join as join_module

    monkeypatch.setattr(join_module, "_preallocate", lambda fd, total, final: None)
    with pytest.raises(InsufficientSpaceError,
                       match="/model.safetensors: the disk filled up while writing; nothing was written"):
        join_parts(parts, expected_sha256=sha256(source), method="readwrite")
    assert_no_output(parts[0].parent)


@pytest.fixture()
def small_tmpfs(tmp_path: Path) -> Path:
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_real_full_disk(model_parts: tuple[Path, list[Path]], small_tmpfs: Path) -> None:
    source, parts = model_parts
    with pytest.raises(InsufficientSpaceError, match="free some space"):
        join_parts(parts, small_tmpfs / "model.safetensors", expected_sha256=sha256(source))
    assert list(small_tmpfs.iterdir()) == []


def test_sigkill_half_way_then_rerun(tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    with open(source, "wb") as handle:
        for _ in range(24):
            handle.write(os.urandom(16 * 1024 * 1024))
    names = ["big.bin.001", "big.bin.002", "big.bin.003"]
    parts = split_bytes(source, tmp_path / "parts", 128 * 1024 * 1024, names=names)
    expected = sha256(source)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "gptq_tools", "join", str(parts[0].parent), "--sha256", expected],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = parts[0].parent
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temps = [p for p in folder.iterdir() if p.name.startswith(".gptq-tools-tmp-")]
        if temps and any(_written(t) > 8 * 1024 * 1024 for t in temps):
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (folder / "big.bin").exists(), "a killed join must never leave a file at the final name"
    result = run_cli("join", str(folder), "--sha256", expected)
    assert result.returncode == 0, result.stderr
    assert sha256(folder / "big.bin") == expected
    assert not [p for p in folder.iterdir() if p.name.startswith(".gptq-tools-tmp-")]


def _written(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def test_cli_join_errors_are_one_line(model_parts: tuple[Path, list[Path]]) -> None:
    source, parts = model_parts
    parts[1].unlink()
    result = run_cli("join", str(parts[0].parent), "--sha256", sha256(source))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("gptq-tools: error: ")
    assert "missing part(s) 'b'" in result.stderr and "Traceback" not in result.stderr


def test_cli_join_json(model_parts: tuple[Path, list[Path]]) -> None:
    import json

    source, parts = model_parts
    result = run_cli("join", *map(str, parts), "-o", str(parts[0].parent.parent / "j.safetensors"),
                     "--sha256", sha256(source), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verified"] is True and report["sha256"] == sha256(source)
    assert set(report["parts"]) == {p.name for p in parts}


@pytest.fixture()
def xfs_mount(tmp_path: Path) -> Path:
    """A small XFS filesystem with reflink, loop-mounted (skipped where that is not possible)."""
    import shutil as _shutil

    if _shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (apt-get install xfsprogs)")
    image, mount_point = tmp_path / "xfs.img", tmp_path / "xfs"
    mount_point.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(320 * 1024 * 1024)
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True, check=False)
    mounted = made.returncode == 0 and subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)],
                                                      capture_output=True, check=False).returncode == 0
    if not mounted:
        pytest.skip("cannot make and loop-mount an XFS filesystem here")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_reflink_join_shares_blocks_on_xfs(xfs_mount: Path) -> None:
    import shutil as _shutil

    parts = []
    for index, size in enumerate((8 * 1024 * 1024, 8 * 1024 * 1024, 1_000_001), start=1):
        part = xfs_mount / f"blob.bin.{index:03d}"
        part.write_bytes(os.urandom(size))
        parts.append(part)
    expected = __import__("hashlib").sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    used_before = _shutil.disk_usage(xfs_mount).used
    result = join_parts(xfs_mount, expected_sha256=expected)
    assert result.method == "reflink" and result.verified
    assert sha256(result.output) == expected
    assert _shutil.disk_usage(xfs_mount).used - used_before < 4 * 1024 * 1024, "reflink must not copy the data"


@pytest.mark.parametrize("method", ["copy_file_range", "readwrite"])
def test_part_changing_during_the_join_is_never_called_verified(model_parts: tuple[Path, list[Path]],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 method: str) -> None:
    """A part rewritten while the join runs (a download still finishing, a sync tool): the byte that
    lands in the output is the changed one, so the output must not be published as verified."""
    source, parts = model_parts
    expected = sha256(source)
    name = "copy_file_range" if method == "copy_file_range" else "pwrite"
    real = getattr(os, name)
    changed = {"done": False}

    def change_then_move(*args: object) -> int:
        if not changed["done"]:  # before the first byte moves, after the join has opened and sized the parts
            changed["done"] = True
            with open(parts[0], "r+b") as handle:
                handle.seek(100)
                byte = handle.read(1)
                handle.seek(100)
                handle.write(bytes([byte[0] ^ 0xFF]))
        return real(*args)

    monkeypatch.setattr(os, name, change_then_move)
    try:
        result = join_parts(parts, expected_sha256=expected, method=method)
    except ChecksumMismatchError as exc:
        assert "SHA256 mismatch" in str(exc)
        assert_no_output(parts[0].parent)
    else:  # readwrite may have read the chunk before the change: then what it wrote is the original
        assert method == "readwrite" and result.verified and sha256(result.output) == expected
    assert changed["done"]
    if method == "copy_file_range":
        assert not (parts[0].parent / "model.safetensors").exists()


def test_copy_file_range_result_is_hashed_from_the_output(model_parts: tuple[Path, list[Path]],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the in-kernel copy put in the output is what is hashed: a copy that lands a wrong byte
    is caught although every part is intact."""
    source, parts = model_parts
    real = os.copy_file_range

    def corrupting_copy(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        copied = real(src, dst, count, offset_src, offset_dst)
        os.pwrite(dst, b"\x00", offset_dst)
        return copied

    monkeypatch.setattr(os, "copy_file_range", corrupting_copy)
    with pytest.raises(ChecksumMismatchError, match="model.safetensors: SHA256 mismatch"):
        join_parts(parts, expected_sha256=sha256(source), method="copy_file_range")
    assert_no_output(parts[0].parent)


@pytest.mark.parametrize("how", ["default SHA256SUMS", "--manifest"])
def test_output_may_not_replace_the_manifest_even_with_force(model_parts: tuple[Path, list[Path]], how: str) -> None:
    source, parts = model_parts
    manifest = parts[0].parent / ("SHA256SUMS" if how == "default SHA256SUMS" else "sums.txt")
    manifest.write_text(f"{sha256(source)}  model.safetensors\n")
    before = manifest.read_bytes()
    with pytest.raises(UsageError, match=f"{manifest.name}: the output would overwrite the manifest the join is "
                                         f"verified against; choose another output name"):
        join_parts(parts, manifest, manifest=manifest if how == "--manifest" else None, force=True)
    assert manifest.read_bytes() == before
    result = run_cli("join", str(parts[0].parent), "-o", str(manifest), "--force",
                     *(["--manifest", str(manifest)] if how == "--manifest" else []))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "the output would overwrite the manifest" in result.stderr and manifest.read_bytes() == before


def test_read_only_destination_names_the_output(model_parts: tuple[Path, list[Path]],
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import tempfile

    from gptq_tools.cli import main as cli_main

    source, parts = model_parts
    target = parts[0].parent.parent / "ro" / "model.safetensors"
    target.parent.mkdir()

    def read_only(*args: object, **kwargs: object) -> object:
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code = cli_main(["join", *map(str, parts), "-o", str(target), "--sha256", sha256(source)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err == (f"gptq-tools: error: {target}: cannot write the output here (the filesystem is read-only); "
                   f"choose another output folder or make {target.parent} writable\n")
    assert list(target.parent.iterdir()) == []


@pytest.fixture()
def read_only_tmpfs(tmp_path: Path) -> Path:
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(mount_point)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_real_read_only_filesystem(model_parts: tuple[Path, list[Path]], read_only_tmpfs: Path) -> None:
    source, parts = model_parts
    result = run_cli("join", *map(str, parts), "-o", str(read_only_tmpfs / "model.safetensors"),
                     "--sha256", sha256(source))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"gptq-tools: error: {read_only_tmpfs / 'model.safetensors'}: cannot write the "
                                    f"output here (the filesystem is read-only)")
    assert ".gptq-tools-tmp-" not in result.stderr


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_joined_file_honours_the_umask(model_parts: tuple[Path, list[Path]], umask: int, mode: int) -> None:
    source, parts = model_parts
    previous = os.umask(umask)
    try:
        for method in ("copy_file_range", "readwrite"):
            result = join_parts(parts, parts[0].parent / f"{method}.safetensors", expected_sha256=sha256(source),
                                method=method)
            assert result.output.stat().st_mode & 0o777 == mode
    finally:
        os.umask(previous)


def test_rerun_after_delete_parts_deleted_some_parts(model_parts: tuple[Path, list[Path]]) -> None:
    source, parts = model_parts
    join_parts(parts, expected_sha256=sha256(source))
    parts[0].unlink()  # what a --delete-parts run killed after its first deletion leaves
    result = join_parts(parts[1].parent, expected_sha256=sha256(source), delete_parts=True)
    assert result.already_done and result.verified and result.deleted_parts == tuple(parts[1:])
    assert snapshot(parts[0].parent) == {"model.safetensors": sha256(source)}
    # without a hash for the joined file, a part set with a gap is still an error
    parts_again = split_bytes(source, parts[0].parent.parent / "again", (source.stat().st_size + 2) // 3)
    join_parts(parts_again)
    parts_again[0].unlink()
    with pytest.raises(PartSetError, match="missing part"):
        join_parts(parts_again[1].parent, delete_parts=True)
