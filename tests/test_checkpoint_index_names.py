"""Index shard names are paths from outside (issue 19): ``weight_map`` values go through the Hub name
validator, in ``verify --structure`` and in the loader; nothing outside the checkpoint is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gptq_tools.cli import main
from gptq_tools.errors import UnsafeNameError
from gptq_tools.runtime.load import load_quantized

from .tiny_gptq import build_tiny_checkpoint

SHARD = "model-00002-of-00002.safetensors"


def hostile_index(tmp_path: Path, value: object) -> tuple[Path, Path]:
    """A sharded tiny checkpoint whose index maps the second shard's tensors to ``value``; the real shard is
    moved to where ``../other/...`` points, so a loader that joined the name blindly would find it there."""
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", layout="sharded")
    folder = checkpoint.folder
    outside = tmp_path / "other"
    outside.mkdir()
    shutil.move(folder / SHARD, outside / SHARD)
    if value == "{absolute}":
        value = str(outside / SHARD)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: (value if v == SHARD else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return folder, outside


HOSTILE = [
    ("../other/" + SHARD, r"has a '\.\.' path segment"),
    ("{absolute}", "is an absolute path"),
    (7, "a name must be text, not int"),
    (None, "a name must be text, not NoneType"),
    (["x"], "a name must be text, not list"),
]


@pytest.mark.parametrize(("value", "reason"), HOSTILE, ids=["dotdot", "absolute", "int", "null", "list"])
def test_index_shard_name_outside_the_folder_fails_verify_structure(tmp_path: Path, value: object, reason: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = hostile_index(tmp_path, value)
    code = main(["verify", "--structure", str(folder)])
    captured = capsys.readouterr()
    assert code == 1, captured
    assert "Traceback" not in captured.err
    assert "FAILED" in captured.out + captured.err
    assert "is not a safe relative file name" in captured.out + captured.err
    assert "OK" not in captured.out.replace("FAILED", "")


@pytest.mark.parametrize(("value", "reason"), HOSTILE, ids=["dotdot", "absolute", "int", "null", "list"])
def test_index_shard_name_outside_the_folder_is_refused_by_the_loader(tmp_path: Path, value: object,
                                                                      reason: str) -> None:
    folder, _ = hostile_index(tmp_path, value)
    with pytest.raises(UnsafeNameError, match=rf"is mapped to shard .* is not a safe relative file name \(.*{reason}"):
        load_quantized(folder)
