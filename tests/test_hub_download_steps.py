"""``download`` publishing steps: a kill right after each one is repaired by a rerun; where the state lives
(never in what ``HfApi.upload_folder`` sends); the move of state left by older versions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gptq_tools.cli import main
from gptq_tools.hub import TransferOptions, download
from gptq_tools.hub.state import LEGACY_STATE_DIR, STATE_DIR, LocalState
from tests.download_helpers import FAST, safetensors_blob, sha256
from tests.helpers import kill_at_each_step, leftovers
from tests.hub_server import HubServer

pytestmark = pytest.mark.timeout(300)

STEM = "w"
WHOLE = safetensors_blob(40_000 - 16 - 8 * 7, 31)


def _repo(server: HubServer) -> dict[str, bytes]:
    parts = {f"{STEM}.JOINBEFOREUSE.split-{c}.safetensors": WHOLE[i * 25_000:(i + 1) * 25_000]
             for i, c in enumerate("ab")}
    files = {**parts, "SHA256SUMS": f"{sha256(WHOLE)}  {STEM}.safetensors\n".encode()}
    server.add_repo("org/split", {"main": files})
    return files


def _folder_state(out: Path) -> dict[str, str]:
    """Hashes of the files at final names, and the names (not contents: mtimes differ) of the state files."""
    files = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
    return {name: "state" if name.startswith(".cache/") else hashlib.sha256(path.read_bytes()).hexdigest()
            for name, path in sorted(files.items())}


def test_kill_after_each_download_step_then_rerun(tmp_path: Path) -> None:
    with HubServer() as server:
        files = _repo(server)
        steps = kill_at_each_step(
            lambda root: None,
            lambda root: ["download", "org/split", "--local-dir", str(root / "out"), "--max-workers", "1",
                          "--delete-parts"],
            lambda root: _folder_state(root / "out"),
            base=tmp_path, env={"HF_ENDPOINT": server.endpoint})
        expected = {"SHA256SUMS": sha256(files["SHA256SUMS"]), f"{STEM}.safetensors": sha256(WHOLE)}
        assert {k: v for k, v in _folder_state(tmp_path / "clean" / "out").items() if v != "state"} == expected
    kinds = [step.split(" ", 1)[0] for step in steps]
    names = [Path(step.split(" ", 1)[1]).name for step in steps]
    # every file renamed into place, the joined file too, both parts deleted, the state written, the
    # empty incomplete/ folder removed
    assert {"SHA256SUMS", f"{STEM}.safetensors", "verified.json", "resolved.json", ".gitignore"} <= set(names)
    assert kinds.count("unlink") == 2 and kinds[-1] == "rmtree" and names[-1] == "incomplete"
    print("kill points:", *steps, sep="\n  ")


def test_rerun_of_a_finished_download_says_it_is_done(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        _repo(server)
        argv = ["download", "org/split", "--local-dir", str(tmp_path)]
        assert main(argv) == 0
        capsys.readouterr()
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert main([*argv, "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
    assert out.startswith("org/split@main (commit ") and out.strip().endswith(
        "already complete, 3 file(s) verified, joined: w.safetensors; nothing to download")
    assert data["already_complete"] is True and data["downloaded"] == [] and data["joined"] == []


def test_upload_folder_would_not_publish_the_download_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``HfApi.upload_folder`` (and so ``hf upload``) would commit from a downloaded folder, with the
    commit itself intercepted (no network): every file of the repository, and nothing of our state."""
    import huggingface_hub.hf_api as hf_api

    with HubServer() as server:
        files = _repo(server)
        download("org/split", local_dir=tmp_path, endpoint=server.endpoint,
                 options=TransferOptions(max_workers=2, **FAST))
    (tmp_path / STATE_DIR / "incomplete").mkdir()
    (tmp_path / STATE_DIR / "incomplete" / f"{'0' * 64}-{'1' * 16}.incomplete").write_bytes(b"partial")
    assert sorted(p.name for p in (tmp_path / STATE_DIR).iterdir()) == ["incomplete", "resolved.json", "verified.json"]
    sent: list[str] = []
    monkeypatch.setattr(hf_api, "is_xet_available", lambda: False)
    monkeypatch.setattr(hf_api.HfApi, "create_commit",
                        lambda self, *, operations, **_: sent.extend(op.path_in_repo for op in operations))
    hf_api.HfApi(endpoint="http://127.0.0.1:9").upload_folder(folder_path=tmp_path, repo_id="me/copy")
    assert sorted(sent) == sorted([*files, f"{STEM}.safetensors"])


def test_state_left_by_an_older_version_is_moved(tmp_path: Path) -> None:
    data = safetensors_blob(30_000, 32)
    with HubServer() as server:
        server.add_repo("org/model", {"main": {"m.safetensors": data, "config.json": b"{}"}})
        options = TransferOptions(max_workers=2, **FAST)
        download("org/model", local_dir=tmp_path, endpoint=server.endpoint, options=options)
        legacy = tmp_path / LEGACY_STATE_DIR
        legacy.parent.mkdir()
        (tmp_path / STATE_DIR).rename(legacy)  # the layout before 0.2, with a partial named by its hash only
        (tmp_path / "m.safetensors").unlink()
        (legacy / "incomplete").mkdir()
        (legacy / "incomplete" / f"{sha256(data)}.incomplete").write_bytes(data[:10_000])
        again = download("org/model", local_dir=tmp_path, endpoint=server.endpoint, options=options)
        ranges = [r for _, _, r in server.resolve_requests("m.safetensors")]
    assert not (tmp_path / ".gptq-tools").exists() and (tmp_path / STATE_DIR / "verified.json").is_file()
    assert again.downloaded == ("m.safetensors",) and ranges[-1] == f"bytes=10000-{len(data) - 1}"  # resumed
    assert (tmp_path / "m.safetensors").read_bytes() == data and leftovers(tmp_path) == []
    assert LocalState(tmp_path).is_verified("config.json", ("git-sha1", server.repos["org/model"].branches["main"]
                                                           ["config.json"].git_oid))


@pytest.mark.parametrize("left", ["empty legacy folder", "both"])
def test_a_migration_cut_short_is_finished(tmp_path: Path, left: str) -> None:
    """The states a kill can leave between the steps of the move (no subprocess needed to reach them)."""
    with HubServer() as server:
        _repo(server)
        options = TransferOptions(max_workers=2, **FAST)
        download("org/split", local_dir=tmp_path, endpoint=server.endpoint, options=options)
        (tmp_path / LEGACY_STATE_DIR.parent).mkdir()
        if left == "both":
            (tmp_path / LEGACY_STATE_DIR).mkdir()
            (tmp_path / LEGACY_STATE_DIR / "verified.json").write_text("{}")
        again = download("org/split", local_dir=tmp_path, endpoint=server.endpoint, options=options)
    assert again.already_complete and not (tmp_path / ".gptq-tools").exists()


def test_partials_of_files_left_out_stay(tmp_path: Path) -> None:
    data = safetensors_blob(30_000, 33)
    with HubServer() as server:
        server.add_repo("org/model", {"main": {"m.safetensors": data, "config.json": b"{}"}})
        partial = LocalState(tmp_path).incomplete_path("m.safetensors", ("sha256", sha256(data)))
        partial.parent.mkdir(parents=True)
        partial.write_bytes(data[:1000])
        download("org/model", local_dir=tmp_path, endpoint=server.endpoint, include=["*.json"],
                 options=TransferOptions(max_workers=2, **FAST))
        assert partial.read_bytes() == data[:1000]  # kept for the run that wants m.safetensors
        download("org/model", local_dir=tmp_path, endpoint=server.endpoint, options=TransferOptions(**FAST))
    assert (tmp_path / "m.safetensors").read_bytes() == data and not partial.parent.exists()
