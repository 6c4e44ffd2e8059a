"""``"cuda-int4"``: PyTorch's CUDA int4 matmul (``aten._weight_int4pack_mm``, tinygemm) for 2-, 3- and 4-bit layers.

The same exact mapping as :mod:`gptq_tools.runtime.kernels.cpu_int4` (``zero = (8 - z) * s``, smaller values
as 4-bit, groups tiled by 32/64/128/256-row op groups, rows sorted for act-order); tinygemm takes bf16
activations, scales and zeros, so its output carries bf16 rounding. The weights are repacked once at
load (``_convert_weight_to_int4pack``: uint8 pairs in, tiled int32 out) and the checkpoint buffers dropped.
"""

from __future__ import annotations

import torch

from ..qlinear import QuantKernel, QuantLinear, register_kernel
from ._common import (
    integer_column_chunks,
    op_group_params,
    permuted_input,
    release_checkpoint_buffers,
    uniform_group_size,
)

NAME = "cuda-int4"
OP_GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = 8
#: tinygemm tiles: outputs a multiple of 8, inputs a multiple of 16 * INNER_K_TILES.
N_MULTIPLE, K_MULTIPLE = 8, 16 * INNER_K_TILES


def unsupported(layer: QuantLinear, device: torch.device) -> str | None:
    """Why ``cuda-int4`` cannot run ``layer`` on ``device`` (None when it can)."""
    if device.type != "cuda":
        return f"needs a CUDA device (this layer runs on {device})"
    if layer.bits not in (2, 3, 4):
        return f"takes values of at most 4 bits; this layer has {layer.bits}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "tinygemm needs compute capability 8.0 or newer"
    if layer.out_features % N_MULTIPLE or layer.in_features % K_MULTIPLE:
        return (f"tinygemm needs out_features % {N_MULTIPLE} == 0 and in_features % {K_MULTIPLE} == 0; "
                f"this layer is {layer.in_features}x{layer.out_features}")
    if uniform_group_size(layer, OP_GROUP_SIZES) is None:
        return (f"groups of {layer.group_size} rows cannot be tiled by the op's group sizes {OP_GROUP_SIZES}")
    return None


@torch.no_grad()
def prepare(layer: QuantLinear) -> None:
    """Repack for tinygemm chunk by chunk (on the layer's device) and drop the checkpoint buffers."""
    op_group = uniform_group_size(layer, OP_GROUP_SIZES)
    n, k = layer.out_features, layer.in_features
    device = layer.qweight.device
    parts, scales_and_zeros = [], torch.empty(k // op_group, n, 2, dtype=torch.bfloat16, device=device)
    for start, stop, intweight, _ in integer_column_chunks(layer, 64):  # (in, c)
        values = intweight.t().to(torch.uint8)  # (c, in)
        pairs = (values[:, 0::2] << 4 | values[:, 1::2]).contiguous()  # (c, in / 2): high nibble first
        parts.append(torch.ops.aten._convert_weight_to_int4pack(pairs, INNER_K_TILES))
        group_zeros, group_scales = op_group_params(layer, op_group, start, stop)
        scales_and_zeros[:, start:stop, 0] = group_scales.to(torch.bfloat16)
        scales_and_zeros[:, start:stop, 1] = ((8 - group_zeros) * group_scales).to(torch.bfloat16)
    release_checkpoint_buffers(layer)
    layer.register_buffer("tinygemm_packed", torch.cat(parts) if len(parts) > 1 else parts[0], persistent=False)
    layer.register_buffer("tinygemm_scales_and_zeros", scales_and_zeros, persistent=False)
    layer.tinygemm_group_size = op_group


def forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """bf16 tinygemm; the result is cast back to the input dtype."""
    flat = permuted_input(layer, x).to(torch.bfloat16)
    out = torch.ops.aten._weight_int4pack_mm(flat, layer.tinygemm_packed, layer.tinygemm_group_size,
                                             layer.tinygemm_scales_and_zeros)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


register_kernel(QuantKernel(name=NAME, forward=forward, supports=lambda layer, device: unsupported(
    layer, device) is None, workspace_bytes=lambda in_features, out_features, dtype: 0,
    unsupported=unsupported, prepare=prepare))
