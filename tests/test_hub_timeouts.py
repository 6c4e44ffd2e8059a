"""Requests that never time out (issue 19): an endpoint that accepts connections and never answers makes
``download`` and ``verify --remote`` fail in bounded time, with the endpoint named, instead of hanging."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from gptq_tools.cli import main
from gptq_tools.errors import HubError
from gptq_tools.hub import TransferOptions, download, remote

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def silent_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``http://127.0.0.1:PORT``: accepts every connection, reads the request, never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
    monkeypatch.setattr(remote, "METADATA_TIMEOUTS", (1.0, 1.0))
    monkeypatch.setattr(remote, "METADATA_BACKOFF_S", 0.05)
    yield endpoint
    stop.set()
    thread.join(2)
    for connection in held:
        connection.close()
    server.close()


def test_metadata_request_to_a_silent_endpoint_times_out_naming_it(silent_endpoint: str) -> None:
    started = time.monotonic()
    options = TransferOptions(connect_timeout=1.0, stall_timeout=1.0)
    with pytest.raises(HubError, match=rf"org/m@main: {silent_endpoint} did not answer in time \(ReadTimeout at "
                                       rf"{silent_endpoint}/api/models/org/m/refs, 3 attempts\)"):
        download("org/m", local_dir="unused-never-created", endpoint=silent_endpoint, options=options)
    assert time.monotonic() - started < 30


def test_verify_remote_against_a_silent_endpoint_is_one_line(silent_endpoint: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code = main(["verify", "--remote", "org/m"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert f"{silent_endpoint} did not answer in time" in err
    assert time.monotonic() - started < 30


def test_metadata_timeout_restores_the_clients_own_setting(silent_endpoint: str) -> None:
    from huggingface_hub.utils import get_session

    before = get_session().timeout
    with pytest.raises(HubError):
        remote.resolve_repo(remote.parse_spec("org/m"), endpoint=silent_endpoint, timeouts=(1.0, 1.0))
    assert get_session().timeout == before
