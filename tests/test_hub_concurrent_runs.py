"""Two runs on one folder (issue 19): one advisory lock per working folder (a download's state folder, a
quantization's staging folder). A second run says which process holds it; a killed run's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptq_tools.cli import main
from gptq_tools.errors import OutputExistsError
from gptq_tools.files.fileio import work_lock
from gptq_tools.hub.downloader import LOCK_NAME
from gptq_tools.hub.state import STATE_DIR
from tests.download_helpers import blob
from tests.hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = blob(600_000, 61)
pytestmark = pytest.mark.timeout(120)


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_downloads_into_one_folder_second_names_the_first_pid_then_takes_over_after_a_kill(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    lock = out / STATE_DIR / LOCK_NAME
    with HubServer() as hub:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.endpoint)
        hub.add_repo("org/m", {"main": {"model.safetensors": DATA}})
        hub.add_fault("slow", "model.safetensors", rate=20_000, times=None)
        first = subprocess.Popen([sys.executable, "-m", "gptq_tools", "download", "org/m", "--local-dir", str(out),
                                  "--max-workers", "1"], env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                                                               "HF_ENDPOINT": hub.endpoint},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for(lock, first)
            code = main(["download", "org/m", "--local-dir", str(out)])
            err = capsys.readouterr().err
            assert code == 1 and "Traceback" not in err, err
            assert f"another gptq-tools process (pid {first.pid}) is already running the download into {out}" in err
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        hub.clear_faults()
        assert lock.exists()  # the killed run's lock file is still there: a stale lock
        assert main(["download", "org/m", "--local-dir", str(out)]) == 0
    assert (out / "model.safetensors").read_bytes() == DATA
    assert not lock.exists()


def test_two_quantize_runs_on_one_output_second_names_the_first_pid(tmp_path: Path) -> None:
    output = tmp_path / "q"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gptq_tools.files.fileio import work_lock\n"
         f"with work_lock({str(tmp_path / '.q.gptq-tools-lock')!r}, what='x'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from gptq_tools.quant.driver import quantize_model

        with pytest.raises(OutputExistsError, match=rf"another gptq-tools process \(pid {holder.pid}\) is already "
                                                    rf"running the quantization into {output}"):
            quantize_model(tmp_path / "no-model", output, calibration=tmp_path / "none.txt")
    finally:
        holder.kill()
        holder.wait()
    assert not output.exists() and not (tmp_path / ".q.gptq-tools-partial").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    lock.write_text(dead.stdout)  # what a killed holder leaves: its PID, and no lock held on the file
    with work_lock(lock, what="test"):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()


def test_lock_file_planted_as_a_symlink_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "lock")
    with pytest.raises(OSError, match="symbolic link"), work_lock(tmp_path / "lock", what="test"):
        pass
    assert victim.read_text() == "keep"
