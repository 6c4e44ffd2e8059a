"""``plan --engine vllm`` prints a command for the checkpoint it sized: a folder as it is (with a word on split
parts there), a quantized preset's repository and branch, or "quantize first" for an fp16 preset."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gptq_tools.cli import main as cli_main
from gptq_tools.runtime.plan import PlanOptions, load_layout
from gptq_tools.serving.plan import folder_notes, serving_target

from .helpers import split_bytes
from .tiny_gptq import build_tiny_checkpoint


def _serve_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("vllm serve")]


def test_fp16_preset_says_quantize_first(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "opt-iml-30b", "--engine", "vllm", "--gpus", "2x80GB"]) == 0
    out = capsys.readouterr().out
    assert _serve_lines(out)[0].startswith("vllm serve ./opt-iml-30b-gptq --tensor-parallel-size 2")
    assert all("facebook/opt-iml-30b" not in line for line in _serve_lines(out))
    assert ("first:\n  gptq-tools download opt-iml-30b\n  gptq-tools quantize ./opt-iml-30b -o ./opt-iml-30b-gptq "
            "--calibration CALIBRATION.txt\n") in out
    assert "note: quantize first: facebook/opt-iml-30b is the fp16 model (15.04 GiB is the 4-bit checkpoint" in out


def test_split_preset_is_served_from_its_joined_download(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "BLOOMZ-176B-GPTQ", "--engine", "vllm", "--gpus", "2x80GB", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["before"] == ["gptq-tools download bloomz-176b-gptq --delete-parts"]
    assert data["commands"]["single_node"][0].startswith("vllm serve ./bloomz-176B-GPTQ --tensor-parallel-size 2")
    assert any("only as split parts, which vLLM cannot read" in note for note in data["notes"])


def test_quantized_preset_branch_is_served_from_the_hub_at_that_branch() -> None:
    layout, _ = load_layout("bloomz-176b-gptq:group_size_128g", options=PlanOptions())
    target = serving_target("bloomz-176b-gptq:group_size_128g", layout)
    assert (target.model, target.revision, target.before) == ("TheBloke/bloomz-176B-GPTQ", "group_size_128g", ())


def test_folder_with_parts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = build_tiny_checkpoint(tmp_path / "ckpt").folder
    (weights,) = folder.glob("*.safetensors")
    assert folder_notes(folder) == ()
    parts = split_bytes(weights, folder, weights.stat().st_size // 2 + 1,
                        names=[f"{weights.stem}.JOINBEFOREUSE.split-{c}.safetensors" for c in "ab"])
    assert folder_notes(folder) == (
        f"{folder} holds {weights.name} and also its 2 split parts; vLLM loads every *.safetensors in the folder, "
        f"the parts too, and fails: remove the parts once `gptq-tools verify` passes (or download with "
        f"--delete-parts)",)
    assert cli_main(["plan", str(folder), "--engine", "vllm", "--gpus", "1x24GB"]) == 0
    out = capsys.readouterr().out
    assert _serve_lines(out)[0].startswith(f"vllm serve {folder} ")
    assert "vLLM loads every *.safetensors in the folder, the parts too" in out
    only_parts = tmp_path / "parts"
    shutil.copytree(folder, only_parts)
    (only_parts / weights.name).unlink()
    assert folder_notes(only_parts) == (
        f"{only_parts} holds {weights.name} only as 2 split parts, which vLLM cannot read: join them first "
        f"(gptq-tools join {only_parts}), then remove the parts",)
    assert len(parts) == 2
