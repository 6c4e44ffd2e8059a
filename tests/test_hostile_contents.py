"""Untrusted contents: special files, lying headers and values, each refused with one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gptq_tools.cli import main as cli_main
from gptq_tools.errors import NotRegularFileError
from gptq_tools.safetensors_format import read_header

from .helpers import random_model_file, raw_safetensors


@pytest.fixture()
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    os.mkfifo(path)
    return path


@pytest.mark.timeout(30)
@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
@pytest.mark.parametrize("command", [["verify", "--structure"], ["inspect"], ["reshard", "--max-shard-size", "1MB",
                                                                              "-o", "OUT"]])
def test_special_files_are_refused_without_blocking(tmp_path: Path, fifo: Path, capsys: pytest.CaptureFixture[str],
                                                    special: str, command: list[str]) -> None:
    target = fifo if special == "fifo" else Path(special)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    code = cli_main([args[0], *args[1:], str(target)] if args[0] != "reshard" else [args[0], str(target), *args[1:]])
    captured = capsys.readouterr()
    assert code != 0
    kind = "a FIFO (named pipe)" if special == "fifo" else "a device"
    assert f"{target}: is {kind}, not a regular file" in captured.out + captured.err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_read_header_names_the_special_file(fifo: Path) -> None:
    with pytest.raises(NotRegularFileError, match="FIFO"):
        read_header(fifo)
    with pytest.raises(NotRegularFileError, match="is a folder"):
        read_header(fifo.parent)


def test_structure_failure_names_the_file_once_and_blames_no_checksum(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    good = random_model_file(tmp_path / "good.safetensors")
    bad = raw_safetensors(tmp_path / "bad.safetensors", {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}},
                          bytes(3))
    assert cli_main(["verify", "--structure", str(good), str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{good}: OK (safetensors, 12 tensors)", f"{bad}: FAILED"]
    lines = captured.err.splitlines()
    assert lines[0].startswith(f"gptq-tools: {bad}: 1 trailing bytes after the last tensor")
    assert lines[0].count(str(bad)) == 1
    assert lines[-1] == "gptq-tools: WARNING: 1 of 2 failed the structure check"
    assert "checksum" not in captured.err
