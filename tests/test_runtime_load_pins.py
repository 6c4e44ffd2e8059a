"""The loader's trust order (issue 19): a pinned hash (the argument or a preset's) is never replaced by a
``SHA256SUMS`` lying beside the weights; a disagreement is an error that names both sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptq_tools.errors import ChecksumMismatchError
from gptq_tools.runtime.load import load_quantized

from .tiny_gptq import build_tiny_checkpoint


def _preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, digest: str) -> None:
    presets = tmp_path / "configs" / "presets"
    presets.mkdir(parents=True, exist_ok=True)
    preset = {"name": "tiny", "repo_id": "test/tiny", "branches": {"main": {"files": {name: {"sha256": digest}}}}}
    (presets / "tiny.json").write_text(json.dumps(preset))
    monkeypatch.setenv("GPTQ_TOOLS_CONFIGS", str(tmp_path / "configs"))


def test_folder_manifest_never_overrides_the_preset_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights swapped together with their SHA256SUMS: the preset's pin still decides, and both are named."""
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    _preset(tmp_path, monkeypatch, checkpoint.weight_name, "e" * 64)
    (checkpoint.folder / "SHA256SUMS").write_text(f"{checkpoint.sha256}  {checkpoint.weight_name}\n")
    with pytest.raises(ChecksumMismatchError, match=rf"{checkpoint.weight_name}: preset tiny pins SHA256 {'e' * 64} "
                                                    rf"but .*SHA256SUMS lists {checkpoint.sha256}"):
        load_quantized(checkpoint.folder, preset="tiny")


def test_folder_manifest_never_overrides_the_expected_sha256_argument(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    (checkpoint.folder / "SHA256SUMS").write_text(f"{'0' * 64}  {checkpoint.weight_name}\n")
    with pytest.raises(ChecksumMismatchError, match=rf"expected_sha256 pins SHA256 {checkpoint.sha256} but "
                                                    rf".*SHA256SUMS lists {'0' * 64}"):
        load_quantized(checkpoint.folder, expected_sha256=checkpoint.sha256)


def test_preset_pin_mismatch_names_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    _preset(tmp_path, monkeypatch, checkpoint.weight_name, "e" * 64)
    with pytest.raises(ChecksumMismatchError, match=rf"expected {'e' * 64} \(from preset tiny\)"):
        load_quantized(checkpoint.folder, preset="tiny")


def test_agreeing_manifest_and_pin_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    _preset(tmp_path, monkeypatch, checkpoint.weight_name, checkpoint.sha256)
    (checkpoint.folder / "SHA256SUMS").write_text(f"{checkpoint.sha256}  {checkpoint.weight_name}\n")
    load_quantized(checkpoint.folder, preset="tiny")
