"""Structural validation of GPTQ checkpoint folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gptq_tools.checkpoint.validate import validate_checkpoint
from gptq_tools.errors import CheckpointError, UnsafeCheckpointError
from gptq_tools.files.safetensors_format import read_header
from gptq_tools.files.split import reshard_file, split_file

from .helpers import run_cli, write_fake_gptq_checkpoint, write_safetensors


@pytest.mark.parametrize(("bits", "group_size", "desc_act"), [(4, 32, False), (4, -1, True), (3, 32, True),
                                                               (2, 64, False), (8, 128, True)])
def test_valid_checkpoints_pass(tmp_path: Path, bits: int, group_size: int, desc_act: bool) -> None:
    folder = write_fake_gptq_checkpoint(tmp_path / "ckpt", bits=bits, group_size=group_size, desc_act=desc_act)
    report = validate_checkpoint(folder)
    assert report.ok and len(report.modules) == 12


def test_sharded_and_split_checkpoints_pass(tmp_path: Path) -> None:
    folder = write_fake_gptq_checkpoint(tmp_path / "ckpt")
    single = next(folder.glob("*.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "quantize_config.json"):
        (sharded / name).write_bytes((folder / name).read_bytes())
    reshard_file(single, sharded, max_shard_size="100KB")
    assert validate_checkpoint(sharded).ok
    split_file(single, max_size="40KiB")
    single.unlink()
    report = validate_checkpoint(folder)
    assert report.ok and report.files[0].is_parts


def _rewrite(folder: Path, change: object) -> None:
    import safetensors.numpy

    path = next(folder.glob("*.safetensors"))
    tensors = safetensors.numpy.load_file(str(path))
    change(tensors)  # type: ignore[operator]
    write_safetensors(path, tensors)


def test_wrong_scales_shape_is_named(tmp_path: Path) -> None:
    folder = write_fake_gptq_checkpoint(tmp_path / "ckpt", group_size=32)
    name = "model.decoder.layers.1.fc2.scales"
    _rewrite(folder, lambda t: t.__setitem__(name, t[name][:3]))
    with pytest.raises(CheckpointError, match=f"{name}: expected F16 \\[8, 64\\] for bits=4, group_size=32"):
        validate_checkpoint(folder)


def test_config_group_size_disagrees_with_tensors(tmp_path: Path) -> None:
    folder = write_fake_gptq_checkpoint(tmp_path / "ckpt", group_size=32)
    qconfig = json.loads((folder / "quantize_config.json").read_text())
    qconfig["group_size"] = 64
    (folder / "quantize_config.json").write_text(json.dumps(qconfig))
    with pytest.raises(CheckpointError,
                       match="layers.0.fc1.qzeros: expected I32 \\[1, 32\\] for bits=4, group_size=64"):
        validate_checkpoint(folder)


def test_g_idx_out_of_range(tmp_path: Path) -> None:
    folder = write_fake_gptq_checkpoint(tmp_path / "ckpt", group_size=32, desc_act=True)
    name = "model.decoder.layers.0.fc1.g_idx"
    _rewrite(folder, lambda t: t.__setitem__(name, np.full_like(t[name], 9)))
    with pytest.raises(CheckpointError, match=f"{name}: values range over \\[9, 9\\] but there are only 2 groups"):
        validate_checkpoint(folder)


def test_missing_layer_linear(tmp_path: Path) -> None:
    folder = write_fake_gptq_checkpoint(tmp_path / "ckpt")
    _rewrite(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.decoder.layers.1.fc1.")])
    with pytest.raises(CheckpointError, match="missing, first model.decoder.layers.1.fc1"):
        validate_checkpoint(folder)


def test_bad_bits_and_missing_shard_and_pickles(tmp_path: Path) -> None:
    folder = write_fake_gptq_checkpoint(tmp_path / "ckpt")
    qconfig = json.loads((folder / "quantize_config.json").read_text())
    (folder / "quantize_config.json").write_text(json.dumps({**qconfig, "bits": 5}))
    with pytest.raises(CheckpointError, match="bits=5 is not one of"):
        validate_checkpoint(folder)
    index = {"weight_map": {"x": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing shard\\(s\\) model-00002-of-00002.safetensors named in"):
        validate_checkpoint(folder)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "quantize_config.json").write_text(json.dumps(qconfig))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeCheckpointError, match="only pickled weights"):
        validate_checkpoint(pickled)


def test_cli_structure_on_folder(tmp_path: Path) -> None:
    folder = write_fake_gptq_checkpoint(tmp_path / "ckpt")
    result = run_cli("verify", "--structure", str(folder))
    assert result.returncode == 0 and "GPTQ checkpoint, 12 quantized modules, bits=4" in result.stdout
    result = run_cli("inspect", str(folder))
    assert result.returncode == 0 and "gptq: bits=4, group_size=32" in result.stdout
    assert read_header(next(folder.glob("*.safetensors"))).tensors
