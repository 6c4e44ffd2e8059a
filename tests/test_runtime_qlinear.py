"""QuantLinear: forward equals x @ dequantize(...).T for every bit width, group size, format and act-order."""

from __future__ import annotations

import pytest
import torch

from gptq_tools.checkpoint.packing import dequantize
from gptq_tools.errors import CheckpointError, UsageError
from gptq_tools.runtime.qlinear import (
    QuantKernel,
    QuantLinear,
    available_kernels,
    get_kernel,
    quant_tensor_shapes,
    register_kernel,
)
from tests.tiny_gptq import quant_layer, random_quant_tensors


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(-1, False), (32, False), (64, True), (48, True), (-1, True)])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_forward_matches_dequantized_matmul(bits: int, group_size: int, act_order: bool,
                                            checkpoint_format: str) -> None:
    in_features, out_features = 96, 64
    tensors = random_quant_tensors(bits, group_size, in_features=in_features, out_features=out_features,
                                   act_order=act_order, checkpoint_format=checkpoint_format)
    layer = quant_layer(tensors, bits, group_size, checkpoint_format=checkpoint_format, bias=True, dtype=torch.float32)
    reference = dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits=bits,
                           checkpoint_format=checkpoint_format, dtype=torch.float32)
    x = torch.randn(2, 5, in_features)
    expected = x @ reference.t() + tensors["bias"].float()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantize_weight(torch.float32), reference)
    assert (layer.input_perm is not None) == (act_order and group_size > 0)  # one group needs no sort


def test_act_order_rows_are_sorted_once_and_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    from gptq_tools.runtime import qlinear

    monkeypatch.setattr(qlinear, "DEQUANT_CHUNK_ELEMENTS", 128 * 32)  # several column blocks
    tensors = random_quant_tensors(4, 32, in_features=128, out_features=96, act_order=True, checkpoint_format="gptq")
    layer = quant_layer(tensors, 4, 32, checkpoint_format="gptq", bias=False, dtype=torch.float32)
    assert bool((layer.g_idx[1:] >= layer.g_idx[:-1]).all())
    reference = dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits=4,
                           dtype=torch.float32)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ reference.t(), rtol=1e-5, atol=1e-5)
    layer.prepare()  # idempotent: a second call must not permute again
    torch.testing.assert_close(layer(x), x @ reference.t(), rtol=1e-5, atol=1e-5)


def test_half_precision_forward_on_cpu() -> None:
    tensors = random_quant_tensors(4, 32, in_features=64, out_features=32, act_order=False, checkpoint_format="gptq_v2")
    layer = quant_layer(tensors, 4, 32, checkpoint_format="gptq_v2", bias=True, dtype=torch.float16)
    x = torch.randn(4, 64, dtype=torch.float16)
    weight = dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits=4,
                        checkpoint_format="gptq_v2", dtype=torch.float16)
    expected = (x.float() @ weight.float().t() + tensors["bias"].float())
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)


def test_shapes_follow_autogptq_layout() -> None:
    assert quant_tensor_shapes(4, 128, 14336, 43008) == {
        "qweight": (1792, 43008), "qzeros": (112, 5376), "scales": (112, 43008), "g_idx": (14336,)}
    assert quant_tensor_shapes(3, -1, 64, 32)["qweight"] == (6, 32)


def test_bad_g_idx_names_the_layer() -> None:
    tensors = random_quant_tensors(4, 32, in_features=64, out_features=32, act_order=False, checkpoint_format="gptq")
    tensors["g_idx"][5] = 7
    layer = QuantLinear(4, 32, 64, 32, bias=False)
    layer.name = "model.layers.0.fc1"
    layer.g_idx.copy_(tensors["g_idx"])
    with pytest.raises(CheckpointError, match=r"model.layers.0.fc1.g_idx: groups must lie in \[0, 2\)"):
        layer.prepare()


def test_bad_construction_arguments() -> None:
    with pytest.raises(UsageError, match="bits=5 is not supported"):
        QuantLinear(5, 32, 64, 32, bias=False)
    with pytest.raises(UsageError, match="in_features=20 cannot be packed at 3 bits"):
        QuantLinear(3, -1, 20, 32, bias=False)
    with pytest.raises(UsageError, match="unknown checkpoint format 'gptq_v9'"):
        QuantLinear(4, 32, 64, 32, bias=False, checkpoint_format="gptq_v9")
    with pytest.raises(UsageError, match="unknown quantized-linear kernel 'nope'; registered kernels: .*torch"):
        QuantLinear(4, 32, 64, 32, bias=False, kernel="nope")


def test_kernel_registry_is_pluggable() -> None:
    calls: list[str] = []

    def forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        calls.append(layer.name)
        return get_kernel("torch").forward(layer, x)

    kernel = QuantKernel(name="test-recording", forward=forward, supports=lambda layer, device: True,
                         workspace_bytes=lambda i, o, d: 0)
    register_kernel(kernel, replace=True)
    assert "test-recording" in available_kernels()
    with pytest.raises(UsageError, match="already registered"):
        register_kernel(kernel)
    tensors = random_quant_tensors(4, 32, in_features=64, out_features=32, act_order=False, checkpoint_format="gptq")
    layer = quant_layer(tensors, 4, 32, checkpoint_format="gptq", bias=False, dtype=torch.float32)
    layer.kernel, layer.name = "test-recording", "probe"
    layer(torch.randn(1, 64))
    assert calls == ["probe"]
