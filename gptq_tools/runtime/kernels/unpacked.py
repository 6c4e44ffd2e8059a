"""``"unpacked"``: 8-bit values unpacked once at load to uint8, dequantized a block at a time per call.

For 8-bit layers no other CPU kernel takes (grouped ones): the uint8 copy is exactly the packed size, and a
call then only converts, scales and multiplies (no shift-and-mask unpacking of int32 words as the reference
does). Lower bit widths would grow in memory (2x for 4 bits, 4x for 2), so they are refused.
"""

from __future__ import annotations

import torch

from ..qlinear import QuantKernel, QuantLinear, register_kernel
from ._common import integer_column_chunks, permuted_input, release_checkpoint_buffers

NAME = "unpacked"
#: Weights dequantized at once per call (bounds the workspace: 4 bytes each plus the uint8 source).
BLOCK_ELEMENTS = 1 << 22


def unsupported(layer: QuantLinear, device: torch.device) -> str | None:
    """Why ``unpacked`` cannot run ``layer`` (None when it can)."""
    if layer.bits != 8:
        return (f"would hold {8 // layer.bits}x the packed bytes of this {layer.bits}-bit layer "
                f"(it stores one byte per weight)")
    return None


@torch.no_grad()
def prepare(layer: QuantLinear) -> None:
    """Unpack the sorted rows to uint8 (in, out) and the zeros and scales per row group; drop the checkpoint."""
    n, k = layer.out_features, layer.in_features
    device = layer.qweight.device
    values = torch.empty(k, n, dtype=torch.uint8, device=device)
    zeros = torch.empty(layer.num_groups, n, dtype=torch.float32, device=device)
    for start, stop, intweight, group_zeros in integer_column_chunks(layer, 32):
        values[:, start:stop] = intweight.to(torch.uint8)
        zeros[:, start:stop] = group_zeros.to(torch.float32)
    scales = layer.scales.to(torch.float32)
    release_checkpoint_buffers(layer)
    layer.register_buffer("unpacked_values", values, persistent=False)
    layer.register_buffer("unpacked_scales", scales, persistent=False)
    layer.register_buffer("unpacked_shift", -(zeros * scales), persistent=False)  # -z * s


def _rows(layer: QuantLinear, table: torch.Tensor) -> torch.Tensor:
    """Per-group (groups, c) to per-row (in, c) for act-order layers with uneven groups."""
    counts = torch.tensor(layer.group_counts, device=table.device)
    return torch.repeat_interleave(table, counts, dim=0)


def forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ (q * s - z * s)`` a column block at a time, in fp32 on the CPU (the input dtype elsewhere)."""
    half_on_cpu = x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)
    compute_dtype = torch.float32 if half_on_cpu else x.dtype
    flat = permuted_input(layer, x).to(compute_dtype)
    k, n, groups = layer.in_features, layer.out_features, layer.num_groups
    out = torch.empty(flat.shape[0], n, dtype=compute_dtype, device=x.device)
    step = min(n, max(32, BLOCK_ELEMENTS // k // 32 * 32))
    for start in range(0, n, step):
        stop = min(start + step, n)
        values = layer.unpacked_values[:, start:stop].to(compute_dtype)  # (in, c)
        scales = layer.unpacked_scales[:, start:stop].to(compute_dtype)
        shift = layer.unpacked_shift[:, start:stop].to(compute_dtype)
        if layer.group_counts is None and k % groups == 0:
            weight = torch.addcmul(shift[:, None, :], values.view(groups, k // groups, stop - start),
                                   scales[:, None, :]).view(k, stop - start)
        elif layer.group_counts is None:  # a last group shorter than the others
            rows = torch.arange(k, device=x.device) // layer.group_size
            weight = torch.addcmul(shift[rows], values, scales[rows])
        else:
            weight = torch.addcmul(_rows(layer, shift), values, _rows(layer, scales))
        out[:, start:stop] = flat @ weight
    if layer.bias is not None:
        out += layer.bias.to(compute_dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def workspace_bytes(in_features: int, out_features: int, dtype: torch.dtype) -> int:
    """One block of dequantized weights and its converted source."""
    return BLOCK_ELEMENTS * (4 + 4)


register_kernel(QuantKernel(name=NAME, forward=forward, supports=lambda layer, device: unsupported(
    layer, device) is None, workspace_bytes=workspace_bytes, unsupported=unsupported, prepare=prepare))
