"""``gptq-tools download``: arguments, output, errors, and a SIGKILL in the middle of a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptq_tools.cli import main
from gptq_tools.cli.download import _default_local_dir
from gptq_tools.hub.state import LocalState
from tests.download_helpers import SeedData, blob, populate, sha256
from tests.hub_server import HubServer

pytestmark = pytest.mark.timeout(120)  # a transfer bug shows up as a hang: fail it instead

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> tuple[HubServer, SeedData]:
    with HubServer() as server:
        # HF_ENDPOINT is read when huggingface_hub is imported; in this process, point its constant here
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        yield server, populate(server)


def test_json_output(hub: tuple[HubServer, SeedData], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server, seed = hub
    assert main(["download", "org/model:dev", "--local-dir", str(tmp_path), "--json", "--max-workers", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["revision"] == "dev" and data["commit"] == server.repos["org/model"].commits["dev"]
    assert sorted(data["downloaded"]) == sorted(seed.model_dev)
    assert data["bytes_downloaded"] == sum(len(d) for d in seed.model_dev.values())
    hashes = {f["path"]: f["hash"] for f in data["files"]}
    assert hashes["model.safetensors"] == sha256(seed.model_dev["model.safetensors"])


def test_human_output(hub: tuple[HubServer, SeedData], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "org/model", "--local-dir", str(tmp_path), "--include", "*.json"]) == 0
    out = capsys.readouterr().out
    assert "org/model@main (commit " in out and "2 file(s)" in out and "downloaded and verified" in out


def test_dry_run_output(hub: tuple[HubServer, SeedData], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "org/split", "--local-dir", str(tmp_path / "x"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "fetch" in out
    assert "gptq_model-4bit--1g.safetensors <- 3 parts (expected sha256 from SHA256SUMS in the repository)" in out
    assert "to download: 879.00 KiB; to join: 878.91 KiB; free:" in out and "(fits)" in out
    assert not (tmp_path / "x").exists()


def test_preset_dry_run_json(hub: tuple[HubServer, SeedData], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "bloomz-176b-gptq:group_size_128g", "--local-dir", str(tmp_path), "--dry-run",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["repo_id"] == "TheBloke/bloomz-176B-GPTQ" and data["revision"] == "group_size_128g"
    assert [f["path"] for f in data["files"]] == ["gptq_model-4bit-128g.safetensors", "quantize_config.json"]
    assert data["joins"] == []


@pytest.mark.parametrize(("argv", "message"), [
    (["org/model:nope"], "gptq-tools: error: org/model has no branch or tag 'nope'; its branches: dev, main"),
    (["org/gated"], "gptq-tools: error: org/gated is gated: accept its conditions at"),
    (["org/missing"], "gptq-tools: error: repository 'org/missing' not found"),
    (["org/model", "--include", "*.gguf"], "gptq-tools: error: org/model@main: no file matches --include"),
])
def test_errors_are_one_line(hub: tuple[HubServer, SeedData], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             argv: list[str], message: str) -> None:
    assert main(["download", *argv, "--local-dir", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_default_local_dir() -> None:
    assert _default_local_dir("bloomz-176b-gptq", None) == Path("bloomz-176B-GPTQ")
    assert _default_local_dir("bloomz-176b-gptq:group_size_128g", None) == Path("bloomz-176B-GPTQ-group_size_128g")
    assert _default_local_dir("org/model", "dev") == Path("model-dev")


def test_sigkill_mid_file_then_rerun(tmp_path: Path) -> None:
    data = blob(9_000_000, 11)  # more than one 4 MiB write block
    checksum = ("sha256", sha256(data))
    incomplete = LocalState(tmp_path / "out").incomplete_path("big.safetensors", checksum)
    with HubServer() as server:
        server.add_repo("org/big", {"main": {"config.json": b"{}", "big.safetensors": data}})
        server.add_fault("slow", "big.safetensors", rate=6_000_000, times=None)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_ENDPOINT": server.endpoint}
        command = [sys.executable, "-m", "gptq_tools", "download", "org/big", "--local-dir", str(tmp_path / "out")]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not (incomplete.exists() and incomplete.stat().st_size > 0):
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
                time.sleep(0.02)
        finally:
            process.send_signal(signal.SIGKILL)
            process.communicate()
        kept = incomplete.stat().st_size
        assert 0 < kept < len(data) and not (tmp_path / "out" / "big.safetensors").exists()
        server.clear_faults()
        rerun = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert rerun.returncode == 0, rerun.stderr
        ranges = [r for _, _, r in server.resolve_requests("big.safetensors")]
    assert (tmp_path / "out" / "big.safetensors").read_bytes() == data
    assert not incomplete.exists()
    assert ranges[-1] == f"bytes={kept}-{len(data) - 1}"  # resumed where the killed run stopped
