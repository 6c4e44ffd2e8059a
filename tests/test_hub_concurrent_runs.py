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


def slow_download(hub: HubServer, out: Path) -> subprocess.Popen:
    """A first ``download org/m`` into ``out`` in another process (one worker; the test slows the server)."""
    return subprocess.Popen([sys.executable, "-m", "gptq_tools", "download", "org/m", "--local-dir", str(out),
                             "--max-workers", "1"], env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                                                          "HF_ENDPOINT": hub.endpoint},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def hold_lock(lock: Path, seconds: float) -> subprocess.Popen:
    """Another process holding ``lock`` for ``seconds`` (it prints ``held`` once it has it), then exiting."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gptq_tools.files.fileio import work_lock\n"
         f"with work_lock({str(lock)!r}, what='x'):\n"
         f"    print('held', flush=True); time.sleep({seconds})"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_two_downloads_into_one_folder_second_names_the_first_pid_then_takes_over_after_a_kill(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    lock = out / STATE_DIR / LOCK_NAME
    with HubServer() as hub:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.endpoint)
        hub.add_repo("org/m", {"main": {"model.safetensors": DATA}})
        hub.add_fault("slow", "model.safetensors", rate=20_000, times=None)
        first = slow_download(hub, out)
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
    holder = hold_lock(tmp_path / ".q.gptq-tools-lock", 60)
    try:
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


# -- --wait-lock: a second run waits for the first instead of refusing -----------------------------------------
def test_wait_lock_download_waits_for_the_first_run_and_does_not_fetch_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A real first download (slowed to ~1.5 s); the second waits, logging periodically, then plans again and
    finds everything there: the file is fetched once."""
    monkeypatch.setattr("gptq_tools.files.fileio.LOCK_WAIT_LOG_SECONDS", 0.4)
    out = tmp_path / "out"
    data = blob(150_000, 62)
    with HubServer() as hub:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.endpoint)
        hub.add_repo("org/m", {"main": {"model.safetensors": data}})
        hub.add_fault("slow", "model.safetensors", rate=100_000, times=None)
        first = slow_download(hub, out)
        try:
            wait_for(out / STATE_DIR / LOCK_NAME, first)
            code = main(["download", "org/m", "--local-dir", str(out), "--wait-lock", "60"])
            captured = capsys.readouterr()
            assert first.wait(timeout=60) == 0, first.communicate()
        finally:
            first.kill()
            first.wait()
        gets = [r for r in hub.resolve_requests("model.safetensors") if r[0] == "GET"]
    assert code == 0, captured.err
    waiting = [line for line in captured.err.splitlines() if "waiting for it (up to" in line]
    assert len(waiting) >= 2, captured.err  # the wait is said at once, then again every LOCK_WAIT_LOG_SECONDS
    assert f"another gptq-tools process (pid {first.pid}) is running the download into {out} here" in waiting[0]
    assert "already complete" in captured.out and len(gets) == 1  # planned again after the wait
    assert (out / "model.safetensors").read_bytes() == data


def test_wait_lock_download_past_the_timeout_fails_with_the_same_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    with HubServer() as hub:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.endpoint)
        hub.add_repo("org/m", {"main": {"model.safetensors": DATA}})
        (out / STATE_DIR).mkdir(parents=True)
        holder = hold_lock(out / STATE_DIR / LOCK_NAME, 60)
        try:
            started = time.monotonic()
            code = main(["download", "org/m", "--local-dir", str(out), "--wait-lock", "1"])
            elapsed = time.monotonic() - started
        finally:
            holder.kill()
            holder.wait()
        assert not hub.resolve_requests()
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"gptq-tools: error: {out / STATE_DIR}: another gptq-tools process (pid {holder.pid}) is already running the "
        f"download into {out} here (waited 1 s); wait for it to finish, or stop it, then run again")
    assert 1 <= elapsed < 20
    assert not (out / "model.safetensors").exists()


def test_wait_lock_quantize_proceeds_once_the_lock_is_released(tmp_path: Path) -> None:
    """The holder lets go after ~1 s: the waiting run goes on to its next step (here: finding no model)."""
    from gptq_tools.errors import GptqToolsError
    from gptq_tools.quant.driver import quantize_model

    holder = hold_lock(tmp_path / ".q.gptq-tools-lock", 1)
    started = time.monotonic()
    with pytest.raises(GptqToolsError) as caught:
        quantize_model(tmp_path / "no-model", tmp_path / "q", calibration=tmp_path / "none.txt", wait_lock=30)
    elapsed = time.monotonic() - started
    holder.wait()
    assert not isinstance(caught.value, OutputExistsError), caught.value
    assert "no-model" in str(caught.value)
    assert 0.5 <= elapsed < 25


def test_wait_lock_quantize_past_the_timeout_fails_with_the_same_line(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    holder = hold_lock(tmp_path / ".q.gptq-tools-lock", 60)
    try:
        code = main(["quantize", str(tmp_path / "no-model"), "-o", str(tmp_path / "q"), "--calibration",
                     str(tmp_path / "none.txt"), "--wait-lock", "0.5"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"gptq-tools: error: {tmp_path}: another gptq-tools process (pid {holder.pid}) is already running the "
        f"quantization into {tmp_path / 'q'} here (waited 0.5 s); wait for it to finish, or stop it, then run again")
    assert "waiting for it (up to" in err


@pytest.mark.parametrize(("value", "message"), [("org/m", "'org/m' is not a number of seconds"),
                                                ("-1", "'-1' must be 0 seconds or more"),
                                                ("nan", "'nan' must be 0 seconds or more")])
def test_wait_lock_value_refusals(value: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["download", "--wait-lock", value, "org/m"])
    assert exited.value.code == 2
    assert f"argument --wait-lock: {message}" in capsys.readouterr().err
