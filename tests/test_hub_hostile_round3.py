"""Hostile input, round 3, on the download side: planted links, linked-in folders, pinned hashes.

Each test is named for the class of attack or fault it covers (issue 19).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gptq_tools.cli import main
from gptq_tools.errors import NotAFolderError, UnsafePathError
from gptq_tools.hub import TransferOptions, download
from gptq_tools.hub.state import STATE_DIR, LocalState
from tests.download_helpers import FAST, blob
from tests.hub_server import HubServer

pytestmark = pytest.mark.timeout(60)

DATA = blob(300_000, 31)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> HubServer:
    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        server.add_repo("org/m", {"main": {"model.safetensors": DATA, "config.json": b"{}"}})
        yield server


def fetch(hub: HubServer, folder: Path, **kwargs: object):
    return download("org/m", local_dir=folder, endpoint=hub.endpoint,
                    options=TransferOptions(max_workers=2, chunk_bytes=64 * 1024, **FAST), **kwargs)


def plant_link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


@pytest.mark.parametrize("name", ["current", "legacy"])
def test_symlink_planted_at_partial_name_is_replaced_and_its_target_untouched(hub: HubServer, tmp_path: Path,
                                                                              name: str) -> None:
    """A link at the computable ``.incomplete`` name (new or pre-0.2 naming) is never written through."""
    out = tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious bytes that must survive\n")
    state = LocalState(out)
    partial = state.incomplete_path("model.safetensors", ("sha256", SHA))
    link = partial if name == "current" else partial.parent / f"{SHA}.incomplete"
    plant_link(link, victim)
    fetch(hub, out)
    assert victim.read_bytes() == b"precious bytes that must survive\n"
    assert not (out / "model.safetensors").is_symlink()
    assert (out / "model.safetensors").read_bytes() == DATA
    assert not os.path.lexists(link)


def test_symlink_planted_at_partial_name_pointing_nowhere_creates_nothing_outside(hub: HubServer,
                                                                                  tmp_path: Path) -> None:
    """A dangling link would make a plain ``open(..., "wb")`` create its target outside the folder."""
    out = tmp_path / "out"
    partial = LocalState(out).incomplete_path("model.safetensors", ("sha256", SHA))
    plant_link(partial, tmp_path / "created-outside")
    fetch(hub, out)
    assert not os.path.lexists(tmp_path / "created-outside")
    assert (out / "model.safetensors").read_bytes() == DATA


def test_linked_state_folder_is_refused_in_one_line(hub: HubServer, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The whole ``incomplete/`` folder swapped for a link to elsewhere: refused, nothing written there."""
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    plant_link(out / STATE_DIR / "incomplete", elsewhere)
    code = main(["download", "org/m", "--local-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("gptq-tools: error: ")
    assert "incomplete: is a symbolic link where gptq-tools needs a folder of its own" in err
    assert list(elsewhere.iterdir()) == []
    assert not (out / "model.safetensors").exists()


def test_linked_subfolder_in_local_dir_is_not_written_through(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A repository folder name that is a link inside ``--local-dir``: the file is not published through it."""
    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        server.add_repo("org/m", {"main": {"sub/model.safetensors": DATA}})
        out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
        elsewhere.mkdir()
        plant_link(out / "sub", elsewhere)
        with pytest.raises(NotAFolderError, match="sub: is a symbolic link, but the repository needs a folder"):
            fetch(server, out)
    assert list(elsewhere.iterdir()) == []


def test_linked_subfolder_planted_after_planning_is_not_written_through(tmp_path: Path) -> None:
    """The same link planted between the plan and the publish: the folder walk refuses it."""
    from gptq_tools.files.fileio import ensure_folder

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    plant_link(out / "sub", elsewhere)
    with pytest.raises(UnsafePathError, match="sub: is a symbolic link where gptq-tools needs a folder"):
        ensure_folder(out / "sub" / "deeper", root=out)
    assert list(elsewhere.iterdir()) == []


# -- pinned hashes against served manifests ------------------------------------------------------------------
STEM = "gptq_model-4bit--1g"


def bloom_hub(monkeypatch: pytest.MonkeyPatch, server: HubServer, configs: Path, *,
              pin_matches_parts: bool) -> tuple[bytes, str]:
    """A miniature ``TheBloke/bloomz-176B-GPTQ`` whose parts are substituted and whose served ``SHA256SUMS``
    vouches for the substitute; the preset pins either the substitute's hash or a different one."""
    from tests.download_helpers import safetensors_blob

    whole = safetensors_blob(299_920, 51)
    parts = {f"{STEM}.JOINBEFOREUSE.split-{c}.safetensors": whole[i * 100_000:(i + 1) * 100_000]
             for i, c in enumerate("abc")}
    served = hashlib.sha256(whole).hexdigest()
    server.add_repo("TheBloke/bloomz-176B-GPTQ", {"main": {**parts, "SHA256SUMS": f"{served}  {STEM}.safetensors\n"
                                                           .encode()}})
    pinned = served if pin_matches_parts else "c" * 64
    pin_preset(monkeypatch, configs, pinned)
    return whole, pinned


def pin_preset(monkeypatch: pytest.MonkeyPatch, configs: Path, digest: str) -> None:
    """The shipped bloomz-176b-gptq preset, pinning ``digest`` for the joined file (via GPTQ_TOOLS_CONFIGS)."""
    import json

    shipped = Path(__file__).resolve().parent.parent / "configs" / "presets" / "bloomz-176b-gptq.json"
    preset = json.loads(shipped.read_text(encoding="utf-8"))
    preset["branches"]["main"]["files"][f"{STEM}.safetensors"]["sha256"] = digest
    (configs / "presets").mkdir(parents=True, exist_ok=True)
    (configs / "presets" / "bloomz-176b-gptq.json").write_text(json.dumps(preset), encoding="utf-8")
    monkeypatch.setenv("GPTQ_TOOLS_CONFIGS", str(configs))


def test_served_manifest_never_overrides_the_preset_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Substituted parts with a matching served SHA256SUMS: refused before any part moves, naming both sources."""
    from gptq_tools.errors import ChecksumMismatchError

    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        _, pinned = bloom_hub(monkeypatch, server, tmp_path / "configs", pin_matches_parts=False)
        with pytest.raises(ChecksumMismatchError,
                           match=rf"{STEM}.safetensors: preset bloomz-176b-gptq pins SHA256 {pinned} but SHA256SUMS in "
                                 r"TheBloke/bloomz-176B-GPTQ@main lists [0-9a-f]{64}; a pinned hash is never "
                                 r"overridden"):
            download("bloomz-176b-gptq", local_dir=tmp_path / "out", endpoint=server.endpoint,
                     options=TransferOptions(max_workers=2, **FAST))
        assert not server.resolve_requests(".JOINBEFOREUSE.split-a.safetensors")  # refused before the parts
    assert not (tmp_path / "out" / f"{STEM}.safetensors").exists()


def test_served_manifest_agreeing_with_the_preset_pin_joins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        whole, _ = bloom_hub(monkeypatch, server, tmp_path / "configs", pin_matches_parts=True)
        result = download("bloomz-176b-gptq", local_dir=tmp_path / "out", endpoint=server.endpoint,
                          options=TransferOptions(max_workers=2, **FAST))
    assert result.joined[0].verified and result.joined[0].expected_from == "preset bloomz-176b-gptq"
    assert (tmp_path / "out" / f"{STEM}.safetensors").read_bytes() == whole


def test_served_manifest_never_overrides_the_sha256_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        bloom_hub(monkeypatch, server, tmp_path / "configs", pin_matches_parts=True)
        code = main(["download", "TheBloke/bloomz-176B-GPTQ", "--local-dir", str(tmp_path / "out"),
                     "--sha256", "d" * 64])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert f"--sha256 pins SHA256 {'d' * 64} but SHA256SUMS in TheBloke/bloomz-176B-GPTQ@main lists" in err


def test_preset_pin_mismatch_names_the_preset_not_the_sha256_option(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a served manifest, a preset pin that the parts fail is reported as the preset's, not --sha256's."""
    from gptq_tools.errors import ChecksumMismatchError
    from tests.download_helpers import safetensors_blob

    whole = safetensors_blob(299_920, 52)
    parts = {f"{STEM}.JOINBEFOREUSE.split-{c}.safetensors": whole[i * 100_000:(i + 1) * 100_000]
             for i, c in enumerate("abc")}
    pin_preset(monkeypatch, tmp_path / "configs", "c" * 64)
    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        server.add_repo("TheBloke/bloomz-176B-GPTQ", {"main": parts})
        with pytest.raises(ChecksumMismatchError, match=r"from preset bloomz-176b-gptq\)") as caught:
            download("bloomz-176b-gptq", local_dir=tmp_path / "out", endpoint=server.endpoint,
                     options=TransferOptions(max_workers=2, **FAST))
    assert "--sha256" not in str(caught.value)


# -- Hub listings bounded by bytes ---------------------------------------------------------------------------
@pytest.mark.parametrize(("route", "declared"), [("api:tree", None), ("api:refs", None), ("api:tree", 1 << 40)],
                         ids=["endless-tree", "endless-refs", "declared-1TiB-tree"])
def test_hub_listing_over_the_byte_cap_is_one_line_naming_the_endpoint(
        hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        route: str, declared: int | None) -> None:
    """A listing (or list of branches) that never ends, or declares a terabyte, is cut off at the cap (made
    small here) as it arrives: one line naming the endpoint and the URL, nothing downloaded."""
    from huggingface_hub.utils import get_session

    monkeypatch.setattr("gptq_tools.hub.remote.HUB_METADATA_MAX_BYTES", 256 * 1024)
    hooks_before = list(get_session().event_hooks["response"])
    hub.add_fault("endless_body", route, declared_bytes=declared)
    code = main(["download", "org/m", "--local-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    what = "tree/" if route == "api:tree" else "refs"
    assert last.startswith(f"gptq-tools: error: {hub.endpoint}: the answer to {hub.endpoint}/api/models/org/m/{what}")
    assert ("declares 1,099,511,627,776 bytes" if declared else "goes on past that") in last
    assert "more than the 262,144 bytes a Hub listing may take" in last and "check HF_ENDPOINT" in last
    assert not hub.resolve_requests()  # refused before any file was asked for
    assert get_session().event_hooks["response"] == hooks_before  # the shared client is left as it was


def test_hub_listing_sent_compressed_is_refused_unbounded_size(hub: HubServer, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A compressed answer could inflate far past the cap, so it is asked for uncompressed and refused if not."""
    hub.add_fault("endless_body", "api:tree", content_encoding="gzip")
    code = main(["download", "org/m", "--local-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(
        f"gptq-tools: error: {hub.endpoint}: the answer to {hub.endpoint}/api/models/org/m/tree/")
    assert "comes compressed (gzip) though it was asked for uncompressed" in err
    assert hub.api_request_headers
    assert all(headers.get("accept-encoding") == "identity" for headers in hub.api_request_headers)


def test_hub_listing_paginating_forever_with_empty_pages_is_one_line(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Empty pages never reach the entry count bound; the number of answers is bounded instead."""
    monkeypatch.setattr("gptq_tools.hub.remote.MAX_LISTING_PAGES", 20)
    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        server.add_repo("org/empty", {"main": {}}).endless_tree = True
        code = main(["download", "org/empty", "--local-dir", str(tmp_path / "out")])
        pages = [r for r in server.requests if "/api/models/org/empty/tree/" in r[1]]
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert "is answer 21 to one listing request; the server is paginating without end" in err
    assert len(pages) == 21


def test_hub_listing_under_the_byte_cap_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap is on each answer, not the whole listing: 3 pages of under 2 KiB each (4.5 KiB in all) pass a
    3 KiB cap."""
    monkeypatch.setattr("gptq_tools.hub.remote.HUB_METADATA_MAX_BYTES", 3 * 1024)
    files = {f"folder/file-{i:03d}.txt": f"{i}\n".encode() for i in range(40)}
    with HubServer(page_size=16) as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        server.add_repo("org/many", {"main": files})
        download("org/many", local_dir=tmp_path / "out", endpoint=server.endpoint,
                 options=TransferOptions(max_workers=2, **FAST))
    assert {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out" / "folder").iterdir()} == \
        {f"folder/{name.rpartition('/')[2]}" for name in files}
