"""Untrusted contents: special files, lying headers and values, each refused with one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from gptq_tools.cli import main as cli_main
from gptq_tools.errors import CheckpointError, NotRegularFileError
from gptq_tools.files.safetensors_format import read_header
from gptq_tools.runtime.load import load_quantized
from gptq_tools.runtime.plan import plan_placement

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


def _lying_copy(tmp_path: Path, checkpoint: TinyCheckpoint, file: str, changes: dict[str, object]) -> Path:
    folder = Path(shutil.copytree(checkpoint.folder, tmp_path / "ckpt"))
    data = json.loads((folder / file).read_text())
    data.update(changes)
    (folder / file).write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(("file", "changes", "message"), [
    ("config.json", {"num_attention_heads": 0}, r"num_attention_heads=0 is out of range \[1, 65536\]"),
    ("config.json", {"hidden_size": 1e9}, "hidden_size must be an integer, got 1000000000.0"),
    ("config.json", {"hidden_size": 10**9}, r"hidden_size=1000000000 is out of range"),
    ("config.json", {"num_hidden_layers": 10**6}, r"num_hidden_layers=1000000 is out of range"),
    ("config.json", {"num_hidden_layers": 1000}, "config.json says 1000 layers but the weights hold 2"),
    ("config.json", {"vocab_size": -5}, r"vocab_size=-5 is out of range"),
    ("config.json", {"vocab_size": 97}, r"implies model.decoder.embed_tokens.weight of shape \(97, 64\)"),
    ("config.json", {"ffn_dim": "256"}, "ffn_dim must be an integer, got '256'"),
    ("config.json", {"num_attention_heads": 5}, "hidden size 64 is not a multiple of the 5 attention heads"),
    ("config.json", {"model_type": 5}, "model_type must be a non-empty string"),
    ("quantize_config.json", {"bits": "four"}, r"bits='four' is not supported"),
    ("quantize_config.json", {"bits": 4.0}, r"bits=4.0 is not supported"),
    ("quantize_config.json", {"bits": 5}, r"bits=5 is not supported"),
    ("quantize_config.json", {"group_size": 0}, r"group_size=0 is invalid"),
    ("quantize_config.json", {"group_size": 12.5}, r"group_size=12.5 is invalid"),
    ("quantize_config.json", {"desc_act": "yes"}, r"desc_act='yes' must be true or false"),
    ("quantize_config.json", {"model_file_base_name": "../x"}, r"model_file_base_name='../x' must be a plain file"),
])
def test_lying_configs_are_refused_before_anything_is_built(tmp_path: Path, tiny_opt: TinyCheckpoint,
                                                            monkeypatch: pytest.MonkeyPatch, file: str,
                                                            changes: dict[str, object], message: str) -> None:
    import gptq_tools.runtime.plan as plan_module

    folder = _lying_copy(tmp_path, tiny_opt, file, changes)

    def must_not_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built from a lying config")

    monkeypatch.setattr(plan_module, "build_meta_model", must_not_build)
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=message):
        plan_placement(folder, max_memory="cpu=10GiB")
    assert time.perf_counter() - started < 1.0


def test_plan_cli_gives_one_line_for_a_lying_config(tmp_path: Path, tiny_opt: TinyCheckpoint,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = _lying_copy(tmp_path, tiny_opt, "config.json", {"num_hidden_layers": 10**6})
    assert cli_main(["plan", str(folder), "--max-memory", "cpu=10GiB"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"gptq-tools: error: {folder / 'config.json'}: num_hidden_layers=1000000 is out of range [1, 16384]; the "
        f"config is corrupt"]


HOSTILE_HEADERS = {
    "5000-digit-integer": (b'{"a":{"dtype":"U8","shape":[1' + b"0" * 5000 + b'],"data_offsets":[0,0]}}',
                           "number out of range"),
    "100000-levels": (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested more than 127 levels"),
    "list-as-dtype": (b'{"a":{"dtype":["F32"],"shape":[0],"data_offsets":[0,0]}}', r"unknown dtype \['F32'\]"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
@pytest.mark.parametrize("command", ["verify", "inspect", "join"])
def test_hostile_headers_give_one_line_in_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        case: str, command: str) -> None:
    header, message = HOSTILE_HEADERS[case]
    if command == "join":
        whole = raw_safetensors(tmp_path / "whole.safetensors", None, header_bytes=header)
        blob = whole.read_bytes()
        half = len(blob) // 2
        parts = [tmp_path / f"model.JOINBEFOREUSE.split-{c}.safetensors" for c in "ab"]
        parts[0].write_bytes(blob[:half])
        parts[1].write_bytes(blob[half:])
        whole.unlink()
        args = ["join", *map(str, parts), "-o", str(tmp_path / "model.safetensors")]
    else:
        path = raw_safetensors(tmp_path / "model.safetensors", None, header_bytes=header)
        args = ["verify", "--structure", str(path)] if command == "verify" else ["inspect", str(path)]
    started = time.perf_counter()
    code = cli_main(args)
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    assert code != 0
    assert elapsed < 2.0
    errors = [line for line in captured.err.splitlines() if "WARNING" not in line]
    assert len(errors) == 1 and re.search(message, errors[0]) if command != "inspect" else \
        re.search(message, captured.out)
    assert "Traceback" not in captured.err
    if command == "join":
        assert not (tmp_path / "model.safetensors").exists()
