"""Hostile input, round 3, on the download side: planted links, linked-in folders, pinned hashes.

Each test is named for the class of attack or fault it covers (issue 19).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gptq_tools.cli import main
from gptq_tools.errors import UnsafePathError
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
        with pytest.raises(UnsafePathError, match="sub: is a symbolic link where gptq-tools needs a folder"):
            fetch(server, out)
    assert list(elsewhere.iterdir()) == []
