"""``download`` leaves a ``SHA256SUMS`` of what it verified (unless the repository ships one), and ``--json``
describes the folder after the work, not the plan before it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from gptq_tools.cli import main
from gptq_tools.files.manifest import parse_manifest
from tests.download_helpers import SeedData, populate, sha256
from tests.hub_server import HubServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HubServer, SeedData]]:
    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        seed = populate(server)
        server.add_repo("org/nosums", {"main": {**seed.split_parts, "config.json": b"{}"}})
        yield server, seed


def test_json_statuses_are_after_the_work(hub: tuple[HubServer, SeedData], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _, seed = hub
    assert main(["download", "org/split", "--local-dir", str(tmp_path), "--json", "--delete-parts"]) == 0
    data = json.loads(capsys.readouterr().out)
    status = {f["path"]: (f["status"], f["have_bytes"]) for f in data["files"]}
    assert status == {**{name: ("deleted", 0) for name in seed.split_parts},
                      "SHA256SUMS": ("present", len((tmp_path / "SHA256SUMS").read_bytes())),
                      "config.json": ("present", 2)}
    assert [j["done"] for j in data["joins"]] == [True]
    assert (data["download_bytes"], data["join_bytes"]) == (0, 0)
    assert data["sha256sums"] is None  # the repository ships its own
    assert main(["download", "org/split", "--local-dir", str(tmp_path / "plan"), "--json", "--dry-run"]) == 0
    planned = json.loads(capsys.readouterr().out)  # a dry run still shows the plan
    assert {f["status"] for f in planned["files"]} == {"missing"} and planned["joins"][0]["done"] is False


def test_sums_written_for_a_repository_without_one(hub: tuple[HubServer, SeedData], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, seed = hub
    assert main(["download", "org/nosums", "--local-dir", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sha256sums"] == str(tmp_path / "SHA256SUMS")
    joined = "gptq_model-4bit--1g.safetensors"
    expected = {**{n: sha256(b) for n, b in seed.split_parts.items()}, "config.json": sha256(b"{}"),
                joined: sha256(seed.split_whole)}
    assert parse_manifest(tmp_path / "SHA256SUMS") == expected
    assert (tmp_path / "SHA256SUMS").read_text() == "".join(f"{h}  {n}\n" for n, h in sorted(expected.items()))
    assert main(["verify", "-c", str(tmp_path / "SHA256SUMS")]) == 0
    # a second run (nothing to do) writes the same file; --delete-parts leaves the deleted parts out
    assert main(["download", "org/nosums", "--local-dir", str(tmp_path)]) == 0
    assert parse_manifest(tmp_path / "SHA256SUMS") == expected


def test_sums_leave_out_deleted_parts_and_the_repository_manifest(hub: tuple[HubServer, SeedData],
                                                                  tmp_path: Path) -> None:
    _, seed = hub
    whole = sha256(seed.split_whole)
    assert main(["download", "org/nosums", "--local-dir", str(tmp_path), "--delete-parts",
                 "--sha256", whole]) == 0
    assert parse_manifest(tmp_path / "SHA256SUMS") == {"config.json": sha256(b"{}"),
                                                      "gptq_model-4bit--1g.safetensors": whole}
    assert main(["download", "org/split", "--local-dir", str(tmp_path / "shipped")]) == 0
    assert (tmp_path / "shipped" / "SHA256SUMS").read_bytes() == f"{whole}  gptq_model-4bit--1g.safetensors\n".encode()
