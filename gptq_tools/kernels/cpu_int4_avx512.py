"""``"cpu-int4-avx512"``: our AVX-512 int4 kernel for 2, 3 and 4 bits, exact in fp32.

PyTorch's CPU int4 op (:mod:`.cpu_int4`) is fast only with bf16 activations, scales and output, so its
results carry bf16 rounding (2**-9 relative), and its fp32 path is several times slower than an fp32
``nn.Linear``. No library ships an x86 int4 matmul that keeps fp32, so this kernel's loops are ours, in C
with AVX-512 intrinsics (``csrc/int4_avx512.c``, built once by :mod:`._native`):

* weights: the 4-bit values in 64-column blocks, half a byte each (2- and 3-bit values shifted to the
  middle of the range, zeros with them); scales in fp16 as the checkpoint has them (fp32 where fp16 would
  round them) and zero points in uint8, so a weight is ``(q - z) * s`` in fp32: bit for bit the
  dequantized reference's weight;
* few tokens (decode): per group, ``sum x * (q - z)`` in fp32 FMAs, then times ``s``, four rows
  (eight, then four) rows of the input at a time over each block of weights, the column blocks split across
  PyTorch's own OpenMP threads;
* many tokens (prefill, from :data:`PREFILL_TOKENS`): a block of columns dequantized to fp32 at a time
  and multiplied by PyTorch's fp32 GEMM;
* groups: any size that tiles every quantization group (act-order rows already sorted by
  :meth:`QuantLinear.prepare`), group size -1 as one group.

It needs an x86 CPU with AVX-512 and a C compiler at first use; where either is missing it says so and
``kernel="auto"`` takes ``cpu-int4``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import platform

import torch

from .. import constants
from ..qlinear import QuantKernel, QuantLinear, register_kernel
from . import _native
from ._common import (
    group_bounds,
    integer_column_chunks,
    op_group_params,
    permuted_input,
    release_checkpoint_buffers,
    require_cpu_input,
)

logger = logging.getLogger(__name__)

NAME = "cpu-int4-avx512"
SOURCE = "int4_avx512.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx2", "-mfma", "-mf16c", "-std=c99", "-fopenmp")
#: Without OpenMP (a compiler that has no -fopenmp): the same loops on one thread.
SERIAL_FLAGS = tuple(flag for flag in FLAGS if flag != "-fopenmp")
#: Output columns per block of the packed layout.
BLOCK_N = 64
#: From this many tokens per call, blocks are dequantized for the fp32 GEMM instead
#: (``scripts/bench_kernels.py``, "prefill threshold ... (avx512 matmul)" rows: they cross between 128 and 256).
PREFILL_TOKENS = 192
#: Weights dequantized at once on the prefill path (bounds its workspace: 4 bytes each).
PREFILL_BLOCK_ELEMENTS = 1 << 23
#: Smallest group (rows) the kernel takes: smaller ones would make the scales outweigh the weights.
MIN_GROUP_ROWS = 16
#: Below this many weights (times tokens) one thread does the whole call: waking the others costs more than
#: they save there.
THREAD_MIN_ELEMENTS = 1 << 21


def _cpu_reason() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU (this is {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability:
        return f"needs AVX-512 (PyTorch reports this CPU as {capability})"
    return None


def library() -> ctypes.CDLL | str:
    """The built kernel library, or why it is unavailable."""
    if constants.native_disabled():
        return "GPTQ_TOOLS_NO_NATIVE is set"
    reason = _cpu_reason()
    if reason is not None:
        return reason
    return _load()


@functools.cache
def _load() -> ctypes.CDLL | str:
    lib = _native.load(SOURCE, FLAGS)
    if isinstance(lib, str):
        serial = _native.load(SOURCE, SERIAL_FLAGS)
        if isinstance(serial, str):
            return lib
        logger.warning("cpu-int4-avx512: built without OpenMP (%s); it runs on one thread", lib)
        lib = serial
    lib.gptq_int4_gemm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 8
    lib.gptq_int4_gemm.restype = None
    lib.gptq_int4_dequantize.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 8
    lib.gptq_int4_dequantize.restype = None
    return lib


def kernel_group_rows(layer: QuantLinear) -> int:
    """Rows per kernel group: the largest size that tiles every quantization group (all rows for one group)."""
    return functools.reduce(math.gcd, group_bounds(layer), 0)


def unsupported(layer: QuantLinear, device: torch.device) -> str | None:
    """Why ``cpu-int4-avx512`` cannot run ``layer`` on ``device`` (None when it can)."""
    if device.type != "cpu":
        return f"runs on the CPU only (this layer runs on {device})"
    if layer.bits not in (2, 3, 4):
        return f"takes values of at most 4 bits; this layer has {layer.bits}"
    rows = kernel_group_rows(layer)
    if rows < MIN_GROUP_ROWS:
        return f"its groups would be {rows} rows (the quantization groups' common divisor); it needs {MIN_GROUP_ROWS}+"
    lib = library()
    return lib if isinstance(lib, str) else None


@torch.no_grad()
def prepare(layer: QuantLinear) -> None:
    """Pack the sorted values into 64-column blocks with fp16 scales and uint8 zeros; drop the checkpoint buffers."""
    rows = kernel_group_rows(layer)
    n, k = layer.out_features, layer.in_features
    padded_n = -(-n // BLOCK_N) * BLOCK_N
    packed = torch.empty(padded_n // BLOCK_N, k, BLOCK_N // 2, dtype=torch.uint8)
    # fp16 as the checkpoint has them (exact); fp32 where fp16 would round them (scales converted to fp32/bf16)
    exact_in_fp16 = bool((layer.scales.to(torch.float16).to(layer.scales.dtype) == layer.scales).all())
    scale_dtype = torch.float16 if exact_in_fp16 else torch.float32
    scales = torch.zeros(k // rows, padded_n, dtype=scale_dtype)  # padding columns: scale 0, output 0
    zeros = torch.zeros(k // rows, padded_n, dtype=torch.uint8)
    offset = 8 - 2 ** (layer.bits - 1)  # 2-bit values 0..3 become 6..9, their zeros with them
    for start, stop, intweight, _ in integer_column_chunks(layer, BLOCK_N):  # (in, c)
        width = -(-(stop - start) // BLOCK_N) * BLOCK_N
        values = torch.zeros(k, width, dtype=torch.uint8)
        values[:, : stop - start] = (intweight + offset).to(torch.uint8)
        blocks = values.view(k, width // BLOCK_N, BLOCK_N).transpose(0, 1)  # (b, k, 64)
        low, high = blocks[..., : BLOCK_N // 2], blocks[..., BLOCK_N // 2:]  # columns j and j + 32 of a block
        packed[start // BLOCK_N: (start + width) // BLOCK_N] = low | (high << 4)
        group_zeros, group_scales = op_group_params(layer, rows, start, stop)  # (kernel groups, c)
        scales[:, start:stop] = group_scales.to(scale_dtype)
        zeros[:, start:stop] = (group_zeros + offset).to(torch.uint8)
    release_checkpoint_buffers(layer)
    layer.register_buffer("avx512_packed", packed, persistent=False)
    # held as their bits (int16 / int32), so that ``model.to(dtype)`` cannot recast them under the kernel
    layer.register_buffer("avx512_scales", scales.view(torch.int16 if exact_in_fp16 else torch.int32),
                          persistent=False)
    layer.register_buffer("avx512_zeros", zeros, persistent=False)
    layer.avx512_group_rows = rows


def forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ W`` from the packed weights (see the module docs for the two paths)."""
    require_cpu_input(layer, x, NAME)
    lib = _load()  # built when the layer was chosen (library()); cached, so no checks on this hot path
    if isinstance(lib, str):
        raise RuntimeError(f"{layer.name or 'QuantLinear'}: kernel {NAME!r} is unavailable: {lib}")
    flat = permuted_input(layer, x).to(torch.float32).contiguous()  # (tokens, in)
    if flat.shape[0] >= PREFILL_TOKENS:
        out = _dequantized_gemm(lib, layer, flat)
    else:
        out = _gemm(lib, layer, flat)
    out = out[:, : layer.out_features]
    if layer.bias is not None:
        out = out + layer.bias.to(torch.float32)
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def _args(layer: QuantLinear) -> tuple[int, int, int, int, int]:
    return (layer.avx512_packed.data_ptr(), layer.avx512_scales.data_ptr(), layer.avx512_zeros.data_ptr(),
            layer.avx512_scales.shape[1], int(layer.avx512_scales.dtype == torch.int32))


def _threads(elements: int) -> int:
    """OpenMP threads for a call over ``elements`` weights x tokens: PyTorch's count, one for small calls."""
    return torch.get_num_threads() if elements >= THREAD_MIN_ELEMENTS else 1


def _gemm(lib: ctypes.CDLL, layer: QuantLinear, flat: torch.Tensor) -> torch.Tensor:
    packed, scales, zeros, n, scales_f32 = _args(layer)
    k, rows, m = layer.in_features, layer.avx512_group_rows, flat.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    lib.gptq_int4_gemm(packed, scales, zeros, flat.data_ptr(), out.data_ptr(), m, n, k, rows, 0, n // BLOCK_N,
                       scales_f32, _threads(k * n * m))
    return out


def _dequantized_gemm(lib: ctypes.CDLL, layer: QuantLinear, flat: torch.Tensor) -> torch.Tensor:
    packed, scales, zeros, n, scales_f32 = _args(layer)
    k, rows = layer.in_features, layer.avx512_group_rows
    per_step = max(1, PREFILL_BLOCK_ELEMENTS // (k * BLOCK_N))
    out = torch.empty(flat.shape[0], n, dtype=torch.float32)
    buffer = torch.empty(k * per_step * BLOCK_N, dtype=torch.float32)
    for first in range(0, n // BLOCK_N, per_step):
        last = min(first + per_step, n // BLOCK_N)
        width = (last - first) * BLOCK_N
        weight = buffer[: k * width].view(k, width)
        lib.gptq_int4_dequantize(packed, scales, zeros, weight.data_ptr(), n, k, rows, first, last, width, scales_f32,
                                 _threads(k * width))
        out[:, first * BLOCK_N: last * BLOCK_N] = flat @ weight
    return out


def workspace_bytes(in_features: int, out_features: int, dtype: torch.dtype) -> int:
    """The prefill path's fp32 block of dequantized weights (the decode path needs none)."""
    return min(PREFILL_BLOCK_ELEMENTS, in_features * max(out_features, BLOCK_N)) * 4


register_kernel(QuantKernel(name=NAME, forward=forward, supports=lambda layer, device: unsupported(
    layer, device) is None, workspace_bytes=workspace_bytes, unsupported=unsupported, prepare=prepare))
