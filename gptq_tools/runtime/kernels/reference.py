"""The reference kernel (``"torch"``): dequantize a column block at a time and multiply, on any device.

Pure PyTorch, so it runs wherever PyTorch runs and reads the checkpoint buffers as they are (no repack):
the kernel every other one is checked against, and the one that serves modules reloaded from disk.
"""

from __future__ import annotations

import torch

from .. import qlinear
from ..qlinear import QuantKernel, QuantLinear, register_kernel

NAME = "torch"


def forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Dequantize a column block at a time and multiply; act-order inputs are permuted once."""
    if layer.input_perm is not None:
        x = x.index_select(-1, layer.input_perm.to(device=x.device, dtype=torch.long))
    # CPUs have no fast half-precision GEMM: multiply in fp32 there (the weights are built in fp32 anyway).
    half_on_cpu = x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)
    compute_dtype = torch.float32 if half_on_cpu else x.dtype
    flat = x.reshape(-1, layer.in_features).to(compute_dtype)  # (tokens, in)
    out = torch.empty(flat.shape[0], layer.out_features, dtype=compute_dtype, device=x.device)
    step = qlinear._column_chunk(layer.in_features, layer.out_features)
    for start in range(0, layer.out_features, step):
        stop = min(start + step, layer.out_features)
        weight = layer.dequantized_columns(start, stop, compute_dtype)  # (in, c)
        out[:, start:stop] = flat @ weight
    if layer.bias is not None:
        out += layer.bias.to(compute_dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def workspace_bytes(in_features: int, out_features: int, dtype: torch.dtype) -> int:
    """Unpacked values and zeros (int64 on the 3-bit path), fp32 products, the result: ~20 bytes per element."""
    elements = in_features * qlinear._column_chunk(in_features, out_features)
    return elements * (8 + 8 + 4 + torch.empty((), dtype=dtype).element_size())


register_kernel(QuantKernel(name=NAME, forward=forward, supports=lambda layer, device: True,
                            workspace_bytes=workspace_bytes))
