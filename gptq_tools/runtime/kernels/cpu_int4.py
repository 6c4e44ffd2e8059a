"""``"cpu-int4"``: PyTorch's own CPU int4 matmul (``aten._weight_int4pack_mm_for_cpu``) for 2, 3 and 4 bits.

The op computes ``x @ ((q - 8) * scale + zero)`` per group of 32/64/128/256 rows with bf16 activations,
scales and zeros. A GPTQ layer maps onto it exactly:

* integer zero point ``z``: ``(q - z) * s = (q - 8) * s + (8 - z) * s``, so ``zero = (8 - z) * s``;
* 2- and 3-bit values are stored as 4-bit values shifted by ``8 - 2**(bits-1)`` to the middle of the
  range, so that a symmetric zero still gives ``zero = 0`` (no large bf16 term to cancel);
* group size -1 and groups the op does not take: the largest op group size that tiles every group
  gets the group's scale and zero replicated (one 256-row op group per 256 rows of a -1 layer);
* act-order: :meth:`QuantLinear.prepare` already sorted the rows (each group is one contiguous run),
  so the input is permuted once per call and the sorted weight is packed.

The weights are repacked once at load (``_convert_weight_to_int4pack_for_cpu``, whose layout depends on the
CPU PyTorch dispatches to: :func:`packed_layout` finds it by probing) and the checkpoint buffers dropped: no
dequantized copy is kept. The op's fp32 and fp16 paths are several times slower than an fp32
``nn.Linear`` on x86 (measured: ``scripts/bench_kernels.py``), so the kernel computes in bf16 for every
input dtype: its results carry bf16 rounding (2**-9 relative) rather than fp16's. Where a C compiler
exists, ``kernel="auto"`` takes :mod:`.cpu_int4_native` (fp32, exact) first; ``kernel="torch"`` is exact
everywhere. The op's cost grows with every token while dequantizing a weight block costs the same for
any count, so from :data:`PREFILL_TOKENS` tokens on (prefill) blocks are dequantized instead, with the
op's own arithmetic (one fused loop compiled by ``torch.compile``, eager passes where it cannot compile),
for the bf16 GEMM (AMX / AVX-512-BF16 where the CPU has them).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from ... import constants
from ..qlinear import QuantKernel, QuantLinear, register_kernel
from ._common import (
    integer_column_chunks,
    permuted_input,
    release_checkpoint_buffers,
    require_cpu_input,
    uniform_group_size,
)

logger = logging.getLogger(__name__)

NAME = "cpu-int4"
#: Group sizes ``_weight_int4pack_mm_for_cpu`` accepts.
OP_GROUP_SIZES = (32, 64, 128, 256)
#: Output columns packed per chunk (a multiple of every layout's block; the padding of the packed weight).
BLOCK_N = 64
#: From this many tokens per call inputs go to the bf16 dequantize-and-GEMM path instead
#: of the int4 op (``scripts/bench_kernels.py``, "prefill threshold" rows, 7168x7168, 2 threads: the op
#: costs ~0.7 ms a token, the fused dequantize path ~50 ms flat plus the GEMM; they cross near 90 tokens).
PREFILL_TOKENS = 96
#: Weights in one GEMM operand on the prefill path (bounds its workspace: 4 bytes each).
PREFILL_BLOCK_ELEMENTS = 1 << 23


def _op_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


class Layout(NamedTuple):
    """How a PyTorch build lays out packed nibbles: blocks of ``block`` output columns, ``(blocks, K, block / 2)``
    bytes; ``split``: the low nibble of byte ``d`` is column ``d``, the high one ``d + block / 2``; else
    (pairs) columns ``2d`` and ``2d + 1``."""

    block: int
    split: bool


#: The layouts PyTorch's CPU int4 packing is known to use: AVX-512 (64 columns, split), AVX2 (32, split),
#: the default build (32, pairs); the probe tries every one of these shapes rather than assuming the CPU.
KNOWN_LAYOUTS = tuple(Layout(block, split) for block in (64, 32, 16) for split in (True, False))


@functools.cache
def packed_layout() -> Layout | None:
    """How this PyTorch build (and the CPU capability it dispatches to) packs int4 weights, found by packing
    a probe and reading it back in each of :data:`KNOWN_LAYOUTS`; None when none fits."""
    if not _op_available():
        return None
    probe = torch.randint(0, 16, (2 * BLOCK_N, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 2)
    halves = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe[:BLOCK_N].contiguous(), 2),
                        torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe[BLOCK_N:].contiguous(), 2)])
    if not torch.equal(packed, halves):  # 64-column chunks must pack independently (we pack in chunks)
        return None
    for layout in KNOWN_LAYOUTS:
        blocks = packed.view(2 * BLOCK_N // layout.block, 64, layout.block // 2)
        if torch.equal(_unpack_blocks(blocks, layout).transpose(1, 2).reshape(2 * BLOCK_N, 64).to(torch.int32),
                       probe):
            return layout
    return None


def _unpack_blocks(blocks: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Packed bytes (blocks, K, block / 2) to 4-bit values (blocks, K, block) in column order (uint8)."""
    low, high = blocks & 15, blocks >> 4
    if layout.split:
        return torch.cat([low, high], dim=-1)
    return torch.stack([low, high], dim=-1).reshape(*blocks.shape[:-1], layout.block)


def unsupported(layer: QuantLinear, device: torch.device) -> str | None:
    """Why ``cpu-int4`` cannot run ``layer`` on ``device`` (None when it can)."""
    if device.type != "cpu":
        return f"runs on the CPU only (this layer runs on {device})"
    if layer.bits not in (2, 3, 4):
        return f"takes values of at most 4 bits; this layer has {layer.bits}"
    if not _op_available():
        return f"this PyTorch ({torch.__version__}) has no aten._weight_int4pack_mm_for_cpu"
    if packed_layout() is None:
        return "this PyTorch build packs int4 weights in a layout this kernel does not know"
    if uniform_group_size(layer, OP_GROUP_SIZES) is None:
        return (f"groups of {layer.group_size} rows (in_features={layer.in_features}) cannot be tiled by the "
                f"op's group sizes {OP_GROUP_SIZES}")
    return None


@torch.no_grad()
def prepare(layer: QuantLinear) -> None:
    """Repack the sorted integer weights for the op, chunk by chunk, and drop the checkpoint buffers."""
    from ._common import op_group_params

    op_group = uniform_group_size(layer, OP_GROUP_SIZES)
    n, k = layer.out_features, layer.in_features
    padded_n = -(-n // BLOCK_N) * BLOCK_N
    packed = torch.empty(padded_n, k // 2, dtype=torch.uint8)
    scales_and_zeros = torch.zeros(k // op_group, padded_n, 2, dtype=torch.bfloat16)
    offset = 8 - 2 ** (layer.bits - 1)  # 2-bit values 0..3 become 6..9: centred on the op's 8
    for start, stop, intweight, _ in integer_column_chunks(layer, BLOCK_N):  # (in, c)
        padded_stop = padded_n if stop == n else stop  # chunks are whole 64-column blocks but for the last
        values = torch.full((padded_stop - start, k), 8, dtype=torch.int32)
        values[: stop - start] = intweight.t() + offset
        packed[start:padded_stop] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2)
        group_zeros, group_scales = op_group_params(layer, op_group, start, stop)  # (op groups, c)
        group_zeros = group_zeros + offset  # the zero of the shifted values
        scales_and_zeros[:, start:stop, 0] = group_scales.to(torch.bfloat16)
        scales_and_zeros[:, start:stop, 1] = ((8 - group_zeros) * group_scales).to(torch.bfloat16)
    release_checkpoint_buffers(layer)
    layer.register_buffer("int4_packed", packed, persistent=False)
    layer.register_buffer("int4_scales_and_zeros", scales_and_zeros, persistent=False)
    layer.int4_group_size = op_group


def forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """bf16 int4 matmul for few tokens; for many, blockwise dequantization plus GEMM (see module docs)."""
    require_cpu_input(layer, x, NAME)
    flat = permuted_input(layer, x)  # (tokens, in)
    tokens = flat.shape[0]
    if tokens >= PREFILL_TOKENS:
        out = _dequantized_gemm(layer, flat.to(torch.bfloat16))
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), layer.int4_packed,
                                                         layer.int4_group_size, layer.int4_scales_and_zeros)
        out = out[:, : layer.out_features].to(torch.float32)
    if layer.bias is not None:
        out += layer.bias.to(torch.float32)
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def _nibble_slots(layout: Layout) -> tuple[slice, slice]:
    """Where the low and the high nibbles of a block's bytes land among its columns."""
    if layout.split:
        return slice(0, layout.block // 2), slice(layout.block // 2, layout.block)
    return slice(0, layout.block, 2), slice(1, layout.block, 2)


def _dequantized_gemm(layer: QuantLinear, flat: torch.Tensor) -> torch.Tensor:
    """``flat @ W`` (``flat`` in bf16) with ``W`` dequantized a few 64-column blocks at a time, each block
    multiplied by one 2-D bf16 GEMM (AMX / AVX-512-BF16 where the CPU has them).

    The weights are the op's own ``(q - 8) * s + zero``, computed in fp32 and rounded once to bf16. The
    dequantization is one fused loop compiled by ``torch.compile`` (:func:`_fused_dequantizer`); where
    that cannot run (no C++ compiler, ``GPTQ_TOOLS_NO_COMPILE=1``) the eager form does the same work in
    several passes (:func:`_eager_dequantized_gemm`).
    """
    dequantize = _fused_dequantizer()
    if dequantize is None:
        return _eager_dequantized_gemm(layer, flat)
    k = layer.in_features
    layout = packed_layout()
    block = layout.block
    blocks = layer.int4_packed.view(-1, k, block // 2)  # (N / block, K, block / 2)
    per_step = max(1, PREFILL_BLOCK_ELEMENTS // (k * block))
    out = torch.empty(flat.shape[0], blocks.shape[0] * block, dtype=torch.float32)
    for first in range(0, blocks.shape[0], per_step):
        last = min(first + per_step, blocks.shape[0])
        cols = slice(first * block, last * block)
        params = layer.int4_scales_and_zeros[:, cols].to(torch.float32)  # (groups, columns, 2)
        try:
            packed = blocks[first:last].transpose(0, 1).contiguous()  # (K, b, block / 2): a plain loop to compile
            scales, zeros = params[..., 0].contiguous(), params[..., 1].contiguous()
            weight = dequantize(packed, scales, zeros, layout.split)
            if "checked" not in _FUSED:
                _check_against_eager(weight, _dequantize_blocks(packed, scales, zeros, layout.split))
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run eager from now on
            _give_up_compiling(exc)
            return _eager_dequantized_gemm(layer, flat)
        out[:, cols] = flat @ weight
    return out[:, : layer.out_features]


def _dequantize_blocks(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, split: bool) -> torch.Tensor:
    """Packed bytes (K, b, block / 2) to the bf16 (K, b * block) weight ``(q - 8) * scale + zero``, in fp32 and
    rounded once; ``scales``/``zeros`` are fp32 (groups, b * block)."""
    k, count, half = packed.shape
    groups = scales.shape[0]
    low = (packed & 15).to(torch.float32)
    high = (packed >> 4).to(torch.float32)
    values = torch.cat([low, high], dim=-1) if split else torch.stack([low, high], dim=-1).flatten(-2)
    width = count * 2 * half
    weight = (values.reshape(groups, k // groups, width) - 8.0) * scales[:, None, :] + zeros[:, None, :]
    return weight.to(torch.bfloat16).reshape(k, width)


_FUSED: dict[str, object] = {}


def _fused_dequantizer() -> Callable[..., torch.Tensor] | None:
    """:func:`_dequantize_blocks` compiled by ``torch.compile`` (dynamic shapes: one compilation for every
    layer), or None where compiling is off or has failed once in this process."""
    if "failed" in _FUSED or constants.compile_disabled():
        return None
    if "compiled" not in _FUSED:
        _separate_forced_capability_cache()
        _FUSED["compiled"] = torch.compile(_dequantize_blocks, dynamic=True)
    return _FUSED["compiled"]  # type: ignore[return-value]


def _separate_forced_capability_cache() -> None:
    """Give a process that forces PyTorch's CPU capability (``ATEN_CPU_CAPABILITY``) a TorchInductor cache of
    its own. TorchInductor's cache key leaves that setting out: a kernel compiled under ``avx2`` on an AVX-512
    machine and loaded by a later plain run aborted it ("double free or corruption"), and one compiled by a
    plain run returned NaN under ``avx2``. A cache folder the user chose (``TORCHINDUCTOR_CACHE_DIR``) is kept."""
    forced = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if not forced or "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}-capability-{forced}"
    logger.debug("cpu-int4: ATEN_CPU_CAPABILITY=%s: TorchInductor caches in %s", forced,
                 os.environ["TORCHINDUCTOR_CACHE_DIR"])


def _check_against_eager(fused: torch.Tensor, eager: torch.Tensor) -> None:
    """Once a process: the compiled loop's first weights against the eager form's (both round once to bf16;
    FMA contraction may move a value by one bf16 step). A compiled kernel loaded from a stale or damaged
    TorchInductor cache has been seen to return NaN: that raises, and the caller runs eager from then on."""
    difference = (fused.float() - eager.float()).abs().max()
    bound = 2 ** -7 * eager.float().abs().max()
    if not bool(torch.isfinite(fused).all()) or bool(difference > bound):
        raise RuntimeError(f"the compiled dequantization disagrees with the eager one (max difference "
                           f"{float(difference):.3g}; a stale TorchInductor cache? clear it, e.g. "
                           f"/tmp/torchinductor_$USER)")
    _FUSED["checked"] = True


def _give_up_compiling(exc: BaseException) -> None:
    _FUSED["failed"] = True
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    logger.warning("cpu-int4: torch.compile failed (%s: %s); prefill runs the eager dequantization, about 3x "
                   "slower on that step (set GPTQ_TOOLS_NO_COMPILE=1 to skip trying)", type(exc).__name__,
                   first_line)


def _eager_dequantized_gemm(layer: QuantLinear, flat: torch.Tensor) -> torch.Tensor:
    """The eager form of :func:`_dequantized_gemm`: each nibble half of a step dequantized and multiplied by
    one 2-D GEMM.

    ``q - 8`` is exact in int8, from the bytes by a mask or an arithmetic shift (folding the 8 into a bf16
    ``zero - 8 * s`` would round a term several times the weight). Each half is read from the packed bytes
    into the contiguous (K, columns) operand of its GEMM, with no interleaving copy; only the
    (tokens, columns) results are written interleaved.
    """
    k = layer.in_features
    layout = packed_layout()
    block = layout.block
    blocks = layer.int4_packed.view(-1, k, block // 2)  # (N / block, K, block / 2)
    per_step = max(1, PREFILL_BLOCK_ELEMENTS // (k * block // 2))
    groups = layer.int4_scales_and_zeros.shape[0]
    slots = _nibble_slots(layout)
    out = torch.empty(flat.shape[0], blocks.shape[0], block, dtype=torch.float32)
    for first in range(0, blocks.shape[0], per_step):
        last = min(first + per_step, blocks.shape[0])
        count, cols = last - first, slice(first * block, last * block)
        params = layer.int4_scales_and_zeros[:, cols]  # (groups, columns, 2) bf16
        scales = params[..., 0].reshape(groups, 1, count, block)
        shift = params[..., 1].reshape(groups, 1, count, block)
        packed = blocks[first:last].transpose(0, 1).contiguous()  # (K, b, block / 2) uint8
        # the high nibble minus 8 is the arithmetic shift of the byte with its top bit flipped
        halves = ((packed & 15).view(torch.int8).sub_(8), (packed ^ 0x80).view(torch.int8) >> 4)
        width = count * block // 2
        for slot, nibbles in zip(slots, halves):  # contiguous (groups, 1, width) parameters: a long inner loop
            half_scales = scales[..., slot].reshape(groups, 1, width)
            half_shift = shift[..., slot].reshape(groups, 1, width)
            weight = torch.addcmul(half_shift, nibbles.view(groups, k // groups, width), half_scales)
            out[:, first:last, slot] = (flat @ weight.view(k, width)).view(-1, count, block // 2)
    return out.view(flat.shape[0], -1)[:, : layer.out_features]


def workspace_bytes(in_features: int, out_features: int, dtype: torch.dtype) -> int:
    """One prefill step at its largest: the fused path's bf16 operand (the eager path's two nibble halves and
    bf16 operand take as much), and the fp32 parameters of the step."""
    return PREFILL_BLOCK_ELEMENTS * (1 + 1 + 2) + PREFILL_BLOCK_ELEMENTS // max(in_features, 1) * 64 * 4


register_kernel(QuantKernel(name=NAME, forward=forward, supports=lambda layer, device: unsupported(
    layer, device) is None, workspace_bytes=workspace_bytes, unsupported=unsupported, prepare=prepare))
