"""Tracebacks instead of one line, unbounded input, credentials on disk (issue 19, class 8): each case is
one error line and a non-zero exit, before anything is written or any work is done."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptq_tools.cli import main
from gptq_tools.hub.state import STATE_DIR
from tests.download_helpers import blob
from tests.hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = blob(20_000, 71)
pytestmark = pytest.mark.timeout(120)


def one_line(code: int, err: str, message: str, *, exit_code: int = 1) -> None:
    assert code == exit_code, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("gptq-tools: error: ") and message in last, err


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> HubServer:
    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        server.add_repo("org/m", {"main": {"model.safetensors": DATA, "sub/config.json": b"{}"}})
        yield server


def test_local_dir_that_is_an_existing_file(hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file"
    target.write_text("mine")
    code = main(["download", "org/m", "--local-dir", str(target)])
    one_line(code, capsys.readouterr().err, "--local-dir is an existing file, not a folder")
    assert target.read_text() == "mine"


def test_folder_where_the_repository_has_a_file(hub: HubServer, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out" / "model.safetensors").mkdir(parents=True)
    code = main(["download", "org/m", "--local-dir", str(tmp_path / "out")])
    one_line(code, capsys.readouterr().err, "is a folder, but the repository has a file 'model.safetensors' there")
    assert not hub.resolve_requests("model.safetensors")  # refused before any byte moved


def test_file_where_the_repository_needs_a_folder(hub: HubServer, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").write_text("a file")
    code = main(["download", "org/m", "--local-dir", str(tmp_path / "out")])
    one_line(code, capsys.readouterr().err, "sub: is a file, but the repository needs a folder there")


def test_credentials_in_hf_endpoint_are_never_saved_in_the_state_file(hub: HubServer, tmp_path: Path) -> None:
    from gptq_tools.hub import TransferOptions, download

    secret = hub.endpoint.replace("http://", "http://alice:s3cret-pass@")
    download("org/m", local_dir=tmp_path / "out", endpoint=secret, options=TransferOptions(max_workers=1))
    saved = (tmp_path / "out" / STATE_DIR / "resolved.json").read_text()
    assert "s3cret-pass" not in saved and "alice" not in saved
    assert json.loads(saved)["main"]["endpoint"] == hub.endpoint
    leaked = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and b"s3cret-pass" in p.read_bytes()]
    assert leaked == []


def test_split_into_an_absurd_number_of_parts_is_refused_unless_forced(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(blob(200_000, 72))
    code = main(["split", str(source), "--max-size", "10"])
    one_line(code, capsys.readouterr().err, "gives 20000 parts (more than 10000); a bare number is bytes",
             exit_code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


def test_reshard_into_more_shards_than_the_open_file_limit_is_one_line(tmp_path: Path) -> None:
    from gptq_tools.files.safetensors_format import build_header

    entries = [(f"t{i}", "U8", (16,)) for i in range(300)]
    header, _ = build_header(entries)
    source = tmp_path / "many.safetensors"
    source.write_bytes(header + bytes(16 * 300))
    script = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))\n"
              "from gptq_tools.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, "reshard", str(source), "-o", str(tmp_path / "out"),
                           "--max-shard-size", "16"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, check=False)
    one_line(done.returncode, done.stderr, "gives 300 shards, but this process may open only 128 files",
             exit_code=2)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("model-*"))


def test_quantize_into_a_symlink_to_an_empty_folder_fails_before_any_work(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    os.symlink(empty, tmp_path / "link")
    from gptq_tools.errors import OutputExistsError
    from gptq_tools.quant.save import check_output_folder

    with pytest.raises(OutputExistsError, match="link: is a symbolic link; the finished checkpoint is published"):
        check_output_folder(tmp_path / "link")


def test_interactive_prompt_line_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """``< /dev/zero`` is one endless line: it is refused at the bound, not read into memory."""
    from gptq_tools.cli import generate as cli_generate
    from gptq_tools.errors import UsageError

    class Endless(io.TextIOBase):
        def __init__(self) -> None:
            self.served = 0

        def readline(self, size: int = -1) -> str:
            assert 0 < size <= cli_generate.MAX_PROMPT_CHARS + 1  # never an unbounded read
            self.served += size
            return "\0" * size

        def isatty(self) -> bool:
            return False

    endless = Endless()
    monkeypatch.setattr("sys.stdin", endless)
    with pytest.raises(UsageError, match=f"a prompt line is longer than {cli_generate.MAX_PROMPT_CHARS} characters"):
        next(cli_generate._stdin_prompts())
    assert endless.served == cli_generate.MAX_PROMPT_CHARS + 1
