"""``"cpu-int8"``: PyTorch's per-channel int8 matmul (``aten._weight_int8pack_mm``) for ungrouped 8-bit layers.

The op computes ``x @ (w * scale).T`` with a signed int8 ``w`` and one scale per output. A GPTQ 8-bit
value ``q`` in [0, 256) with zero ``z`` maps exactly: ``(q - z) * s = (q - 128) * s + (128 - z) * s``; the
second term is ``sum(x) * (128 - z) * s``, one fp32 outer product. The op runs with a scale of 1 (so its
int8 weights are exact) and the true fp32 scale multiplies the result. Its fp32 path is slower than an fp32
``nn.Linear``, so it runs in bf16 (the output is rounded to bf16). Grouped 8-bit layers would need one call
per group, measured far slower than the fallback: they are refused with that reason.
"""

from __future__ import annotations

import torch

from ..qlinear import QuantKernel, QuantLinear, register_kernel
from ._common import integer_column_chunks, permuted_input, release_checkpoint_buffers, require_cpu_input

NAME = "cpu-int8"


def unsupported(layer: QuantLinear, device: torch.device) -> str | None:
    """Why ``cpu-int8`` cannot run ``layer`` on ``device`` (None when it can)."""
    if device.type != "cpu":
        return f"runs on the CPU only (this layer runs on {device})"
    if layer.bits != 8:
        return f"takes 8-bit layers; this layer has {layer.bits} bits"
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return f"this PyTorch ({torch.__version__}) has no aten._weight_int8pack_mm"
    if layer.num_groups != 1:
        return (f"takes one scale per output channel; this layer has {layer.num_groups} groups "
                f"(one op call per group is slower than the fallback)")
    return None


@torch.no_grad()
def prepare(layer: QuantLinear) -> None:
    """Store ``q - 128`` as int8 (out, in) and the fp32 scale and zero term; drop the checkpoint buffers."""
    n, k = layer.out_features, layer.in_features
    weight = torch.empty(n, k, dtype=torch.int8)
    offsets = torch.empty(n, dtype=torch.float32)
    for start, stop, intweight, zeros in integer_column_chunks(layer, 32):  # (in, c), (1, c)
        weight[start:stop] = (intweight.t() - 128).to(torch.int8)
        offsets[start:stop] = (128 - zeros[0]).to(torch.float32)
    scales = layer.scales[0].to(torch.float32)
    release_checkpoint_buffers(layer)
    layer.register_buffer("int8_weight", weight, persistent=False)
    layer.register_buffer("int8_unit_scales", torch.ones(n, dtype=torch.bfloat16), persistent=False)
    layer.register_buffer("int8_scales", scales, persistent=False)
    layer.register_buffer("int8_offsets", offsets * scales, persistent=False)  # (128 - z) * s


def forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``s * (x @ (q - 128)) + sum(x) * (128 - z) * s`` (+ bias)."""
    require_cpu_input(layer, x, NAME)
    flat = permuted_input(layer, x)
    product = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), layer.int8_weight, layer.int8_unit_scales)
    out = product.to(torch.float32) * layer.int8_scales
    out += flat.to(torch.float32).sum(dim=1, keepdim=True) * layer.int8_offsets
    if layer.bias is not None:
        out += layer.bias.to(torch.float32)
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


register_kernel(QuantKernel(name=NAME, forward=forward, supports=lambda layer, device: unsupported(
    layer, device) is None, workspace_bytes=lambda in_features, out_features, dtype: 0,
    unsupported=unsupported, prepare=prepare))
