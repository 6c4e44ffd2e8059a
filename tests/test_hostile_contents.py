"""Untrusted contents: special files, lying headers and values, each refused with one line."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from gptq_tools.cli import main as cli_main
from gptq_tools.errors import CheckpointError, NotRegularFileError
from gptq_tools.load import load_quantized
from gptq_tools.safetensors_format import read_header

from .helpers import random_model_file, raw_safetensors
from .tiny_gptq import TinyCheckpoint, build_tiny_checkpoint


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


def _rewrite_tensor(path: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    tensors = safetensors.numpy.load_file(str(path))
    tensors[name] = change(tensors[name])
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    """One small act-order OPT checkpoint, copied by each test that damages it."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "opt", desc_act=True)


QWEIGHT = "model.decoder.layers.0.self_attn.q_proj.qweight"
SCALES = "model.decoder.layers.1.fc1.scales"
G_IDX = "model.decoder.layers.0.fc2.g_idx"


@pytest.mark.parametrize(("name", "change", "message"), [
    (SCALES, lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a).astype(a.dtype),
     rf"tensor {SCALES}: 1 of \d+ values are NaN or infinite"),
    (SCALES, lambda a: np.full_like(a, np.inf), rf"tensor {SCALES}: \d+ of \d+ values are NaN or infinite"),
    (SCALES, lambda a: np.full(a.shape, 1e6, dtype=np.float32),
     rf"tensor {SCALES}: \d+ of \d+ values are NaN or infinite in torch.float16"),
    (QWEIGHT, lambda a: a.astype(np.float32), rf"tensor '{QWEIGHT}' is stored as F32 but must be I32"),
    (QWEIGHT, lambda a: a.astype(np.int64), rf"tensor '{QWEIGHT}' is stored as I64 but must be I32"),
    (QWEIGHT, lambda a: a[:-1], rf"tensor '{QWEIGHT}' has shape"),
    (SCALES, lambda a: a.astype(np.int32), rf"tensor '{SCALES}' is stored as I32 but must be a float dtype"),
    (G_IDX, lambda a: a + 1000, rf"{G_IDX}: groups must lie in \[0, \d+\)"),
    (G_IDX, lambda a: a - 1, rf"{G_IDX}: groups must lie in \[0, \d+\)"),
])
def test_bad_tensor_values_are_refused_with_the_tensor_name(tmp_path: Path, tiny_opt: TinyCheckpoint, name: str,
                                                            change: Callable[[np.ndarray], np.ndarray],
                                                            message: str) -> None:
    folder = Path(shutil.copytree(tiny_opt.folder, tmp_path / "ckpt"))
    _rewrite_tensor(folder / tiny_opt.weight_name, name, change)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(folder, dtype=torch.float16, verify_hash=False)
