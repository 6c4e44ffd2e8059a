"""scripts/interop.py: the variant list keeps every axis, and (where the client venvs exist) the default
checkpoint loads in transformers, GPTQModel and vLLM with our logits, and vLLM's refusals are its own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gptq_tools import constants

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import interop  # noqa: E402 - a script, imported from its folder


def test_variants_keep_every_axis_and_every_default() -> None:
    chosen = interop.variants(["opt", "bloom", "llama"])
    assert len({v.name for v in chosen}) == len(chosen)
    assert {v.arch for v in chosen} == {"opt", "bloom", "llama"}
    assert {v.group_size for v in chosen} == {-1, 32, 128}
    assert {v.act_order for v in chosen} == {"dynamic", "static", "off"}
    assert {v.sym for v in chosen} == {True, False}
    assert {v.fmt for v in chosen} == {"gptq", "gptq_v2"}
    assert {v.bits for v in chosen} == {4, 8}
    for arch in ("opt", "bloom", "llama"):
        defaults = [v for v in chosen if v.arch == arch and v.is_default]
        assert {v.layout for v in defaults} == {"shards", "single"}
    assert interop.Variant("opt").cli_args() == ["--bits", "4", "--group-size", "128", "--desc-act",
                                                 "--static-groups", "--sym", "--format", "gptq"]


def test_cells_show_the_difference_or_the_clients_message() -> None:
    assert interop.cell({"status": "ok", "max_abs_diff": 0.0312}) == "OK 0.031"
    assert interop.cell({"status": "mismatch", "max_abs_diff": 2.5}) == "MISMATCH 2.500"
    assert interop.cell({"status": "refused", "message": "ValueError: a | b"}) == "refused: ValueError: a / b"


def _run(tmp_path: Path, variant: interop.Variant, client: str) -> dict:
    folder = tmp_path / variant.name
    interop.quantize(variant, interop.float_model(tmp_path / f"float-{variant.arch}", variant.arch), folder,
                     interop.calibration(tmp_path / "calibration.safetensors"))
    rows = interop.run_client(client, [folder], tmp_path)
    return interop.compare(interop.references(folder), rows[str(folder)])


@pytest.mark.slow
@pytest.mark.skipif(not constants.gptqmodel_python().exists(),
                    reason="no GPTQModel + transformers venv (make venv-gptqmodel, or set GPTQMODEL_PYTHON)")
@pytest.mark.parametrize("client", ["transformers", "transformers-torch", "gptqmodel"])
def test_default_checkpoint_loads_in_transformers_and_gptqmodel(tmp_path: Path, client: str) -> None:
    result = _run(tmp_path, interop.Variant("llama", layout="single"), client)
    assert result["status"] == "ok", result


@pytest.mark.slow
@pytest.mark.skipif(not constants.vllm_python().exists(), reason="no vLLM venv (make venv-vllm, or set VLLM_PYTHON)")
def test_vllm_refuses_dynamic_act_order_with_its_own_message(tmp_path: Path) -> None:
    result = _run(tmp_path, interop.Variant("opt", group_size=32, act_order="dynamic"), "vllm")
    assert result["status"] == "refused"
    assert "GPTQ group activation ordering (desc_act=True) is no longer supported" in result["message"]
