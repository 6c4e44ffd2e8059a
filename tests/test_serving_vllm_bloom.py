"""Our vLLM BLOOM plugin: the QKV reorder on GPTQ tensors (CPU, always) and vLLM loading our BLOOM
checkpoints through it (only where a vLLM venv exists: ``VLLM_PYTHON``, default .venv-vllm)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from gptq_tools import constants
from gptq_tools.checkpoint.packing import pack_qweight, pack_qzeros, unpack_qzeros, unpack_rows
from gptq_tools.serving.integrations.bloom_qkv import repack_qkv_tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADS, HEAD_SIZE, IN = 4, 16, 64
OUT = 3 * HEADS * HEAD_SIZE


def _vllm_order(values: torch.Tensor, dim: int) -> torch.Tensor:
    """What vLLM's own _repack_qkv does to a float weight, applied along ``dim``."""
    moved = values.movedim(dim, 0)
    shape = moved.shape
    moved = moved.reshape((HEADS, 3, -1) + shape[1:]).transpose(0, 1).reshape(shape)
    return moved.movedim(0, dim)


def test_float_weight_and_bias_are_reordered_like_vllm_does() -> None:
    weight, bias = torch.randn(OUT, IN), torch.randn(OUT)
    assert torch.equal(repack_qkv_tensor("h.0.self_attention.query_key_value.weight", weight, heads=HEADS,
                                         out_features=OUT), _vllm_order(weight, 0))
    assert torch.equal(repack_qkv_tensor("h.0.self_attention.query_key_value.bias", bias, heads=HEADS,
                                         out_features=OUT), _vllm_order(bias, 0))


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_tensors_are_reordered_along_their_output_dimension(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    intweight = torch.randint(0, 2**bits, (IN, OUT), generator=generator)  # (in, out)
    zeros = torch.randint(1, 2**bits, (2, OUT), generator=generator)  # (groups, out)
    scales = torch.rand(2, OUT, generator=generator).half()
    g_idx = torch.arange(IN, dtype=torch.int32) // 32
    name = "transformer.h.0.self_attention.query_key_value."
    qweight = repack_qkv_tensor(name + "qweight", pack_qweight(intweight, bits), heads=HEADS, out_features=OUT)
    qzeros = repack_qkv_tensor(name + "qzeros", pack_qzeros(zeros, bits), heads=HEADS, out_features=OUT)
    assert torch.equal(unpack_rows(qweight, bits, IN), _vllm_order(intweight, 1))
    assert qzeros.dtype == torch.int32
    assert torch.equal(unpack_qzeros(qzeros, bits, OUT), _vllm_order(zeros, 1))
    assert torch.equal(repack_qkv_tensor(name + "scales", scales, heads=HEADS, out_features=OUT),
                       _vllm_order(scales, 1))
    assert repack_qkv_tensor(name + "g_idx", g_idx, heads=HEADS, out_features=OUT) is g_idx


def test_qzeros_of_unsupported_packing_are_refused_by_name() -> None:
    odd = torch.zeros(2, 7, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"h\.0\.self_attention\.query_key_value\.qzeros: qzeros \(2, 7\) for 192 "
                                         r"outputs is not 2/4/8-bit packing"):
        repack_qkv_tensor("h.0.self_attention.query_key_value.qzeros", odd, heads=HEADS, out_features=OUT)


VLLM_PYTHON = constants.vllm_python()


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM venv (make venv-vllm, or set VLLM_PYTHON)")
@pytest.mark.parametrize("layout", ["ours", "thebloke"])
def test_vllm_loads_our_bloom_checkpoint_through_the_plugin(tmp_path: Path, layout: str) -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import interop

    variant = (interop.Variant("bloom") if layout == "ours" else
               interop.Variant("bloom", group_size=-1, act_order="dynamic", layout="thebloke"))
    folder = tmp_path / variant.name
    interop.quantize(variant, interop.float_model(tmp_path / "float", "bloom"), folder,
                     interop.calibration(tmp_path / "calibration.safetensors"))
    assert "lm_head.weight" in json.loads(_header(folder))  # the tied head that vLLM's own BLOOM trips over
    rows = interop.run_client("vllm", [folder], tmp_path)
    result = interop.compare(interop.references(folder), rows[str(folder)])
    assert result["status"] == "ok", result


def _header(folder: Path) -> str:
    path = next(folder.glob("*.safetensors"))
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return handle.read(size).decode()


def test_plugin_registers_our_bloom_under_vllms_architecture_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from gptq_tools.serving.integrations import vllm as plugin

    registered = []
    fake = types.ModuleType("vllm")
    fake.ModelRegistry = types.SimpleNamespace(register_model=lambda *args: registered.append(args))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    plugin.register()
    assert registered == [("BloomForCausalLM", "gptq_tools.serving.integrations.vllm_bloom:GptqBloomForCausalLM")]
    entry = f"vllm.general_plugins =\n    {plugin.PLUGIN_NAME} = gptq_tools.serving.integrations.vllm:register"
    assert entry in (REPO_ROOT / "setup.cfg").read_text()  # the entry point vLLM finds it by
