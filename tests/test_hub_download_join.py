"""Join on arrival: part sets are joined as soon as their parts are verified, against the expected hash.

Most tests use a stand-in for ``gptq_tools.files.join.join_parts`` (same signature and result, recording its
calls) so they check what the downloader asks for; the last tests run the real join when it is there.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from gptq_tools.errors import ChecksumMismatchError, OutputExistsError, UsageError
from gptq_tools.hub import TransferOptions, download
from tests.download_helpers import FAST, SeedData, blob, populate, sha256
from tests.hub_server import HubServer

pytestmark = pytest.mark.timeout(120)  # a transfer bug shows up as a hang: fail it instead

STEM = "gptq_model-4bit--1g"
PUBLISHED = "50baeab9859362d22df6f822f158b9ba75b44ffc6605b715992fe6245aa6e93a"


class JoinRecorder:
    """A stand-in ``join_parts``: concatenates, checks ``expected_sha256``, records each call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.seen_while_joining: list[set[str]] = []

    def __call__(self, parts: list[Path], output: Path | None = None, *, expected_sha256: str | None = None,
                 manifest: Path | None = None, force: bool = False, delete_parts: bool = False,
                 method: str = "auto", progress: bool | None = None,
                 expected_source: str | None = None) -> types.SimpleNamespace:
        self.calls.append({"parts": [Path(p) for p in parts], "output": Path(output), "expected": expected_sha256,
                           "force": force, "delete_parts": delete_parts})
        self.seen_while_joining.append({p.name for p in Path(output).parent.iterdir()})
        data = b"".join(Path(p).read_bytes() for p in parts)
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise ChecksumMismatchError(f"{output}: joined sha256 {digest} != expected {expected_sha256}")
        if Path(output).exists() and not force:
            raise OutputExistsError(f"{output}: exists")
        Path(output).write_bytes(data)
        if delete_parts:
            for part in parts:
                Path(part).unlink()
        return types.SimpleNamespace(output=Path(output), sha256=digest, part_sha256={}, total_bytes=len(data),
                                     verified=expected_sha256 is not None, method="copy")


def _parse_manifest(path: Path) -> dict[str, str]:
    lines = Path(path).read_text().splitlines()
    return {line[66:].lstrip("*"): line[:64] for line in lines if line.strip()}


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> JoinRecorder:
    fake = JoinRecorder()
    monkeypatch.setitem(sys.modules, "gptq_tools.files.join", types.SimpleNamespace(join_parts=fake))
    monkeypatch.setitem(sys.modules, "gptq_tools.files.manifest", types.SimpleNamespace(parse_manifest=_parse_manifest))
    return fake


@pytest.fixture
def hub() -> tuple[HubServer, SeedData]:
    with HubServer() as server:
        yield server, populate(server)


def opts() -> TransferOptions:
    return TransferOptions(max_workers=3, chunk_bytes=64 * 1024, **FAST)


def test_parts_joined_with_the_hash_from_sha256sums(hub: tuple[HubServer, SeedData], tmp_path: Path,
                                                    recorder: JoinRecorder) -> None:
    server, seed = hub
    result = download("org/split", local_dir=tmp_path, endpoint=server.endpoint, options=opts())
    (call,) = recorder.calls
    assert [p.name for p in call["parts"]] == sorted(seed.split_parts)
    assert call["output"] == tmp_path / f"{STEM}.safetensors" and call["expected"] == sha256(seed.split_whole)
    assert (tmp_path / f"{STEM}.safetensors").read_bytes() == seed.split_whole
    (joined,) = result.joined
    assert joined.verified and joined.expected_from == "SHA256SUMS in the repository"
    again = download("org/split", local_dir=tmp_path, endpoint=server.endpoint, options=opts())
    assert again.downloaded == () and again.joined == () and len(recorder.calls) == 1


def test_joined_while_other_files_still_arrive(tmp_path: Path, recorder: JoinRecorder) -> None:
    whole = blob(300_000, 7)
    parts = {f"w.JOINBEFOREUSE.split-{c}.bin": whole[i * 100_000:(i + 1) * 100_000] for i, c in enumerate("abc")}
    with HubServer() as server:
        server.add_repo("org/late", {"main": {**parts, "z-last.bin": blob(400_000, 8)}})
        server.add_fault("slow", "z-last.bin", rate=400_000, times=None)
        download("org/late", local_dir=tmp_path, endpoint=server.endpoint, sha256=[sha256(whole)],
                 options=TransferOptions(max_workers=2, chunk_bytes=1 << 20, **FAST))
    assert "z-last.bin" not in recorder.seen_while_joining[0]
    assert (tmp_path / "w.bin").read_bytes() == whole and (tmp_path / "z-last.bin").stat().st_size == 400_000


def test_preset_hash_is_enforced(hub: tuple[HubServer, SeedData], tmp_path: Path, recorder: JoinRecorder) -> None:
    server, _ = hub
    with pytest.raises(ChecksumMismatchError, match=f"expected {PUBLISHED}"):
        download("bloomz-176b-gptq", local_dir=tmp_path, endpoint=server.endpoint, options=opts())
    assert recorder.calls[0]["expected"] == PUBLISHED
    assert not (tmp_path / f"{STEM}.safetensors").exists()


def test_sha256_option_and_delete_parts(hub: tuple[HubServer, SeedData], tmp_path: Path,
                                        recorder: JoinRecorder) -> None:
    server, seed = hub
    result = download("bloomz-176b-gptq", local_dir=tmp_path, endpoint=server.endpoint, options=opts(),
                      sha256=[f"{STEM}.safetensors={sha256(seed.split_whole)}"], delete_parts=True)
    assert result.joined[0].verified and result.joined[0].expected_from == "--sha256"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", "SHA256SUMS", f"{STEM}.safetensors",
                                                          "quantize_config.json"]  # the repository ships no sums
    again = download("bloomz-176b-gptq", local_dir=tmp_path, endpoint=server.endpoint, options=opts(),
                     sha256=[sha256(seed.split_whole)])
    assert again.downloaded == () and len(recorder.calls) == 1  # parts gone, joined file verified: nothing to do


def test_no_join_keeps_parts(hub: tuple[HubServer, SeedData], tmp_path: Path, recorder: JoinRecorder) -> None:
    download("org/split", local_dir=tmp_path, endpoint=server_endpoint(hub), options=opts(), join=False)
    assert recorder.calls == [] and not (tmp_path / f"{STEM}.safetensors").exists()


def test_foreign_joined_output_is_refused(hub: tuple[HubServer, SeedData], tmp_path: Path,
                                         recorder: JoinRecorder) -> None:
    (tmp_path / f"{STEM}.safetensors").write_bytes(b"someone else's")
    with pytest.raises(OutputExistsError, match=rf"{STEM}.safetensors already exist\(s\) there"):
        download("org/split", local_dir=tmp_path, endpoint=server_endpoint(hub), options=opts())
    download("org/split", local_dir=tmp_path, endpoint=server_endpoint(hub), options=opts(), force=True)
    assert recorder.calls[0]["force"] is True


def server_endpoint(hub: tuple[HubServer, SeedData]) -> str:
    return hub[0].endpoint


def test_with_the_real_join(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    pytest.importorskip("gptq_tools.files.join", reason="gptq_tools.files.join (split-file assembly) is not merged yet")
    pytest.importorskip("gptq_tools.files.manifest", reason="gptq_tools.files.manifest is not merged yet")
    server, seed = hub
    result = download("org/split", local_dir=tmp_path, endpoint=server.endpoint, options=opts())
    assert result.joined[0].verified and (tmp_path / f"{STEM}.safetensors").read_bytes() == seed.split_whole
    assert all((tmp_path / p).read_bytes() == d for p, d in seed.split_parts.items())  # parts kept


def test_real_join_rejects_the_wrong_whole_file(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    pytest.importorskip("gptq_tools.files.join", reason="gptq_tools.files.join (split-file assembly) is not merged yet")
    with pytest.raises(ChecksumMismatchError):
        download("bloomz-176b-gptq", local_dir=tmp_path, endpoint=server_endpoint(hub), options=opts())
    assert not (tmp_path / f"{STEM}.safetensors").exists()


def test_join_failure_does_not_hang_other_threads() -> None:
    assert not [t for t in threading.enumerate() if t.name.startswith(("download-", "join"))]


def test_delete_parts_needs_a_published_hash(tmp_path: Path, recorder: JoinRecorder) -> None:
    parts = {f"w.JOINBEFOREUSE.split-{c}.bin": blob(1000, i) for i, c in enumerate("ab")}
    with HubServer() as server:
        server.add_repo("org/nohash", {"main": parts})
        with pytest.raises(UsageError, match=r"--delete-parts needs a published SHA256 of w.bin \(give --sha256"):
            download("org/nohash", local_dir=tmp_path, endpoint=server.endpoint, delete_parts=True, options=opts())
        result = download("org/nohash", local_dir=tmp_path, endpoint=server.endpoint, options=opts())
    assert recorder.calls[0]["expected"] is None and not result.joined[0].verified
    assert result.joined[0].expected_from == "none" and all((tmp_path / p).exists() for p in parts)


def test_delete_parts_needs_the_output_in_sha256sums(tmp_path: Path, recorder: JoinRecorder) -> None:
    parts = {f"w.JOINBEFOREUSE.split-{c}.bin": blob(1000, i) for i, c in enumerate("ab")}
    sums = f"{'0' * 64}  other.bin\n".encode()
    with HubServer() as server:
        server.add_repo("org/unlisted", {"main": {**parts, "SHA256SUMS": sums}})
        with pytest.raises(UsageError, match=r"--delete-parts needs a published SHA256 of w.bin \(give --sha256"):
            download("org/unlisted", local_dir=tmp_path, endpoint=server.endpoint, delete_parts=True, options=opts())
        assert recorder.calls == [] and all((tmp_path / p).exists() for p in parts)
        download("org/unlisted", local_dir=tmp_path, endpoint=server.endpoint, options=opts())
        with pytest.raises(UsageError, match=r"--delete-parts needs a published SHA256 of w.bin"):
            download("org/unlisted", local_dir=tmp_path, endpoint=server.endpoint, delete_parts=True, options=opts())
    assert len(recorder.calls) == 1 and all((tmp_path / p).exists() for p in parts)
