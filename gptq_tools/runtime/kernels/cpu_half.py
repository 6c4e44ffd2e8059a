"""fp32 linear layers whose weights the checkpoint stores in fp16 (an untied ``lm_head``), kept in fp16 on the CPU.

Loaded with ``dtype=torch.float32``, such a layer would hold an fp32 copy of its fp16 weights: twice the memory,
and twice the bytes read per token, where decode is bound by memory bandwidth (the ``lm_head`` of a 1B LLaMA
with an 8000-token vocabulary reads 65 MB a token in fp32, as much as two and a half of its 4-bit layers).
:class:`HalfStoredLinear` keeps the fp16 weights and computes in fp32: for few tokens the native library's
``gptq_f16_gemm`` (each weight converted exactly to fp32 in registers, fp32 FMAs, on the int4 kernel's thread
pool), for many (prefill) blocks of rows converted to fp32 for PyTorch's GEMM. fp16 to fp32 is exact, so the
products are those of the fp32 layer; only the summation order differs (about fp32's epsilon).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from . import cpu_int4_native

#: Up to this many tokens a call takes the native GEMV; more (prefill) take PyTorch's GEMM on converted blocks.
NATIVE_TOKENS = 8
#: Weights converted to fp32 at once on the prefill path (bounds its workspace: 4 bytes each).
BLOCK_ELEMENTS = 1 << 22


class HalfStoredLinear(nn.Module):
    """``nn.Linear`` with fp32 inputs and outputs and fp16-stored weights (exactly the checkpoint's values)."""

    def __init__(self, linear: nn.Linear, lib: ctypes.CDLL) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # held as its bits, so that ``model.to(dtype)`` cannot recast it under the kernel
        self.register_buffer("weight_bits", linear.weight.detach().to(torch.float16).contiguous().view(torch.int16))
        self.register_buffer("bias_fp32", None if linear.bias is None else linear.bias.detach().float())
        self._lib = lib

    @property
    def weight(self) -> torch.Tensor:
        """The weights as fp32 (a copy): for code that inspects ``module.weight``."""
        return self.weight_bits.view(torch.float16).float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16, compute=fp32"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        tokens = flat.shape[0]
        if tokens <= NATIVE_TOKENS and flat.device.type == "cpu":
            out = torch.empty(tokens, self.out_features, dtype=torch.float32)
            threads = cpu_int4_native.call_threads(self.in_features * self.out_features)
            self._lib.gptq_f16_gemm(self.weight_bits.data_ptr(), flat.data_ptr(), out.data_ptr(), tokens,
                                    self.out_features, self.in_features, threads)
        else:
            weights = self.weight_bits.view(torch.float16)
            step = max(1, BLOCK_ELEMENTS // self.in_features)
            out = torch.empty(tokens, self.out_features, dtype=torch.float32, device=flat.device)
            for first in range(0, self.out_features, step):
                out[:, first: first + step] = flat @ weights[first: first + step].float().T
        if self.bias_fp32 is not None:
            out = out + self.bias_fp32
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def exactly_fp16(weight: torch.Tensor) -> bool:
    """Whether every value of an fp32 ``weight`` is an fp16 value (so fp16 storage loses nothing)."""
    return weight.dtype == torch.float32 and bool((weight.to(torch.float16).to(torch.float32) == weight).all())
