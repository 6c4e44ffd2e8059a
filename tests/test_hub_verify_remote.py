"""``verify --remote``: a repository's manifest checked against the test Hub's own SHA256s, no weights fetched."""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

from gptq_tools.cli import main
from gptq_tools.errors import ManifestError
from gptq_tools.hub.verify_remote import verify_remote
from tests.download_helpers import SeedData, blob, populate
from tests.hub_server import HubServer, ServedFile

pytestmark = pytest.mark.timeout(120)

WEIGHTS = blob(300_000, 11)
CONFIG = b'{"model_type": "opt"}'
BLOOM_SHA = "50baeab9859362d22df6f822f158b9ba75b44ffc6605b715992fe6245aa6e93a"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sums(**entries: str) -> bytes:
    return "".join(f"{digest}  {name}\n" for name, digest in entries.items()).encode()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HubServer, SeedData]]:
    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        seed = populate(server)
        good = sums(**{"model.safetensors": sha(WEIGHTS), "config.json": sha(CONFIG)})
        server.add_repo("org/published", {
            "main": {"model.safetensors": WEIGHTS, "config.json": CONFIG, "README.md": b"# card\n",
                     ".gitattributes": b"*.safetensors filter=lfs\n", "SHA256SUMS": good},
            "broken": {"model.safetensors": WEIGHTS, "config.json": CONFIG,
                       "SHA256SUMS": sums(**{"model.safetensors": "0" * 64, "config.json": sha(CONFIG),
                                             "tokenizer.json": sha(b"{}")}) + b"garbage\n"},
            "lying": {"model.safetensors": WEIGHTS,
                      "config.json": ServedFile("config.json", len(CONFIG), "1" * 40, None, data=CONFIG),
                      "SHA256SUMS": good}})
        yield server, seed


def run(*args: str) -> tuple[str, str, int]:
    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.TextIOWrapper(out, write_through=True), io.TextIOWrapper(err, write_through=True)
    try:
        code = main(["verify", *args])
        return out.getvalue().decode(), err.getvalue().decode(), code
    finally:
        sys.stdout, sys.stderr = saved


def test_published_repository_passes(hub: tuple[HubServer, SeedData]) -> None:
    server, _ = hub
    stdout, stderr, code = run("--remote", "org/published")
    commit = server.repos["org/published"].commits["main"]
    assert code == 0
    assert stdout == (f"org/published@main = commit {commit}; checking against org/published@main/SHA256SUMS\n"
                      "model.safetensors: OK\nconfig.json: OK\n")
    assert stderr == "gptq-tools: WARNING: 1 file in org/published@main is not listed in " \
                     "org/published@main/SHA256SUMS: README.md\n"
    assert run("--remote", "org/published", "--strict")[2] == 1
    fetched = [path for _, path, _ in server.resolve_requests()]
    assert not any(path.endswith("model.safetensors") for path in fetched)  # no weights downloaded
    assert all(f"/resolve/{commit}/" in path for path in fetched)  # pinned to the resolved commit


def test_mismatch_and_missing_files(hub: tuple[HubServer, SeedData]) -> None:
    server, _ = hub
    stdout, stderr, code = run("--remote", "org/published:broken", "--warn")
    commit = server.repos["org/published"].commits["broken"]
    assert code == 1
    assert stdout.splitlines()[1:] == ["model.safetensors: FAILED", "config.json: OK",
                                       "tokenizer.json: FAILED open or read"]
    assert stderr == (f"gptq-tools: tokenizer.json: not in org/published@broken (commit {commit})\n"
                      "gptq-tools: org/published@broken/SHA256SUMS: 4: improperly formatted SHA256 checksum line\n"
                      "gptq-tools: WARNING: 1 line is improperly formatted\n"
                      "gptq-tools: WARNING: 1 listed file could not be read\n"
                      "gptq-tools: WARNING: 1 computed checksum did NOT match\n")
    report = verify_remote("org/published:broken")
    assert report.results[0].detail == f"the Hub's LFS SHA256 is {sha(WEIGHTS)}"


def test_served_bytes_must_match_the_listing(hub: tuple[HubServer, SeedData]) -> None:
    stdout, stderr, code = run("--remote", "org/published:lying")
    assert code == 1 and stdout == ""
    assert "config.json: the Hub listed 21 bytes with id 1111111111111111111111111111111111111111 but served" in stderr


def test_local_manifest_against_a_repository(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    _, seed = hub
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_bytes(sums(**{"./model.safetensors": sha(seed.model_main["model.safetensors"])}))
    stdout, stderr, code = run("--remote", "org/model", "--manifest", str(manifest), "--quiet")
    assert code == 0 and stdout.splitlines()[1:] == []
    assert "3 files in org/model@main are not listed" in stderr and "README.md, config.json" in stderr


def test_split_upload_needs_a_download_for_the_joined_hash(hub: tuple[HubServer, SeedData]) -> None:
    stdout, stderr, code = run("--remote", "org/split")
    assert code == 1  # nothing could be verified without a download
    assert stdout.splitlines()[1:] == ["gptq_model-4bit--1g.safetensors: UNVERIFIED"]
    assert stderr == ("gptq-tools: gptq_model-4bit--1g.safetensors: NOT verified: a joined file: 3 parts in the "
                      "repository (3 with no hash in the manifest); the joined SHA256 can only be checked by "
                      "downloading it\n"
                      "gptq-tools: WARNING: 1 file in org/split@main is not listed in org/split@main/SHA256SUMS: "
                      "config.json\n"
                      "gptq-tools: org/split@main/SHA256SUMS: no file was verified\n")


def test_preset_with_part_hashes(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    _, seed = hub
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_bytes(sums(**{"gptq_model-4bit--1g.safetensors": BLOOM_SHA},
                              **{name: sha(data) for name, data in seed.bloom_parts.items()}))
    junit = tmp_path / "remote.xml"
    stdout, stderr, code = run("--remote", "bloomz-176b-gptq:main", "--manifest", str(manifest),
                               "--junit", str(junit))
    assert code == 0
    assert stdout.splitlines()[1:] == ["gptq_model-4bit--1g.safetensors: UNVERIFIED"] + [
        f"{name}: OK" for name in seed.bloom_parts]
    assert "the joined SHA256 can only be checked by downloading it" in stderr and "each checked" in stderr
    root = ElementTree.parse(junit).getroot()
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("4", "0", "1")


def test_preset_without_a_manifest_uses_its_published_hash(hub: tuple[HubServer, SeedData]) -> None:
    report = verify_remote("bloomz-176b-gptq")
    assert report.source == "preset/bloomz-176b-gptq"
    assert [(r.name, r.status) for r in report.results] == [("gptq_model-4bit--1g.safetensors", "UNVERIFIED")]
    assert report.uncovered == ("quantize_config.json",) and not report.passed()


def test_no_manifest_anywhere(hub: tuple[HubServer, SeedData]) -> None:
    server, _ = hub
    with pytest.raises(ManifestError, match="has no SHA256SUMS and no manifest was given; pass --manifest FILE"):
        verify_remote("org/model")
    stdout, stderr, code = run("--remote", "org/nope")
    assert code == 1 and stdout == "" and stderr.startswith("gptq-tools: error: repository 'org/nope' not found")
    assert stderr.count("\n") == 1

