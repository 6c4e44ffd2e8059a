"""``"triton"``: our own Triton GEMV/GEMM for 2-, 4- and 8-bit GPTQ layers with fp16 (or fp32) activations.

It reads the checkpoint buffers as they are (no repack: it also serves modules reloaded from disk):
each program computes a ``BLOCK_M x BLOCK_N`` tile of the output, walking the inputs ``BLOCK_K`` rows at a
time; per row it unpacks the int32 words of ``qweight``, looks up the row's group in ``g_idx`` (sorted at
load for act-order, so a tile's rows touch one or two groups and the loads stay cached), unpacks that
group's zero from ``qzeros`` and computes ``(q - z) * s`` in fp32 before the ``tl.dot`` (fp32 accumulation).
3-bit values straddle int32 words and are refused.

Correctness runs on the CPU under ``TRITON_INTERPRET=1`` (``tests/test_kernels.py``); speed needs a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch

from ...constants import triton_interpret
from ..qlinear import QuantKernel, QuantLinear, register_kernel

NAME = "triton"
BLOCK_N = 64
BLOCK_K = 64


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def unsupported(layer: QuantLinear, device: torch.device) -> str | None:
    """Why ``triton`` cannot run ``layer`` on ``device`` (None when it can)."""
    if layer.bits not in (2, 4, 8):
        return f"takes 2-, 4- or 8-bit values packed whole into int32 words; this layer has {layer.bits} bits"
    if not _triton_importable():
        return "triton is not installed"
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
        return f"needs a CUDA device (this layer runs on {device}; TRITON_INTERPRET=1 runs it on the CPU, slowly)"
    return None


@functools.cache
def _compiled(interpret: bool) -> Any:
    """The jitted kernel; built on first use (and again if TRITON_INTERPRET changes, as in the tests)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gptq_matmul(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, out_ptr, m_size, n_size, k_size,
                    stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
                    BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        per_word: tl.constexpr = 32 // BITS
        mask_value: tl.constexpr = (1 << BITS) - 1
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < m_size, cols < n_size
        zero_shift = (cols % per_word) * BITS
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # a builtin: stdlib tl.zeros is jitted at import
        for k_start in range(0, k_size, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_ok = ks < k_size
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            tile_ok = k_ok[:, None] & col_ok[None, :]
            words = tl.load(qweight_ptr + (ks // per_word)[:, None] * stride_qk + cols[None, :], mask=tile_ok,
                            other=0)
            values = (words >> ((ks % per_word) * BITS)[:, None]) & mask_value
            groups = tl.load(g_idx_ptr + ks, mask=k_ok, other=0)
            scales = tl.load(scales_ptr + groups[:, None] * stride_sg + cols[None, :], mask=tile_ok, other=0.0)
            zero_words = tl.load(qzeros_ptr + groups[:, None] * stride_zg + (cols // per_word)[None, :],
                                 mask=tile_ok, other=0)
            zeros = ((zero_words >> zero_shift[None, :]) & mask_value) + ZERO_OFFSET
            weight = ((values - zeros).to(tl.float32) * scales.to(tl.float32)).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, weight, input_precision="ieee")
            else:
                acc += tl.dot(x, weight)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    return gptq_matmul


def forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """One launch over (token blocks, output blocks); act-order inputs are permuted once."""
    import triton

    if layer.input_perm is not None:
        x = x.index_select(-1, layer.input_perm.to(device=x.device, dtype=torch.long))
    flat = x.reshape(-1, layer.in_features).contiguous()
    tokens = flat.shape[0]
    out = torch.empty(tokens, layer.out_features, dtype=x.dtype, device=x.device)
    block_m = 16 if tokens <= 16 else 32 if tokens <= 32 else 64
    grid = (triton.cdiv(tokens, block_m), triton.cdiv(layer.out_features, BLOCK_N))
    _compiled(triton_interpret())[grid](
        flat, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, out, tokens, layer.out_features,
        layer.in_features, flat.stride(0), layer.qweight.stride(0), layer.scales.stride(0), layer.qzeros.stride(0),
        out.stride(0), BITS=layer.bits, ZERO_OFFSET=1 if layer.checkpoint_format == "gptq" else 0,
        IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    if layer.bias is not None:
        out += layer.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], layer.out_features)


register_kernel(QuantKernel(name=NAME, forward=forward, supports=lambda layer, device: unsupported(
    layer, device) is None, workspace_bytes=lambda in_features, out_features, dtype: 0, unsupported=unsupported))
