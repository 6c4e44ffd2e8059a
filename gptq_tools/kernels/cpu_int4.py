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

The weights are repacked once at load (``_convert_weight_to_int4pack_for_cpu``) and the checkpoint buffers
dropped: no dequantized copy is kept. The op's fp32 and fp16 paths are several times slower than an fp32
``nn.Linear`` on x86 (measured: ``scripts/bench_kernels.py``), so decode runs in bf16; its output is
rounded to bf16, which bounds the error at about bf16 rounding (2**-9 relative) rather than fp16's.
The op's cost grows with every token while dequantizing a weight block costs the same for any count, so
from :data:`PREFILL_TOKENS` tokens on (prefill) blocks are dequantized instead, in bf16 (one table lookup
and one multiply-add per weight) for the bf16 GEMM (AMX / AVX-512-BF16 where the CPU has them); fp32
activations from :data:`EXACT_TOKENS` tokens on are dequantized exactly in fp32 for the fp32 GEMM
(slower: fp32 models ask for fp32 results).
"""

from __future__ import annotations

import functools

import torch

from ..qlinear import QuantKernel, QuantLinear, register_kernel
from ._common import column_step, permuted_input, release_checkpoint_buffers, uniform_group_size

NAME = "cpu-int4"
#: Group sizes ``_weight_int4pack_mm_for_cpu`` accepts.
OP_GROUP_SIZES = (32, 64, 128, 256)
#: Output columns per block of the packed layout.
BLOCK_N = 64
#: From this many tokens per call half-precision inputs go to the bf16 dequantize-and-GEMM path instead
#: of the int4 op (``scripts/bench_kernels.py``, "prefill threshold" rows, 7168x7168 on the shared 2-core
#: machine: the op took 2.65 s at 128 tokens and grows ~20 ms a token; the dequantize path ~7 s flat).
PREFILL_TOKENS = 256
#: From this many tokens per call fp32 inputs get the exact fp32 dequantize-and-GEMM path.
EXACT_TOKENS = 16
#: Weights dequantized at once on the prefill path (bounds its workspace: about 12 bytes each).
PREFILL_BLOCK_ELEMENTS = 1 << 23


def _op_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


@functools.cache
def packed_layout() -> str | None:
    """How this PyTorch build lays out packed nibbles, found by packing a probe: ``"split"`` (low nibble
    column ``d``, high ``d + 32`` of each 64-column block), ``"pairs"`` (``2d``, ``2d + 1``), or None."""
    if not _op_available():
        return None
    probe = torch.randint(0, 16, (2 * BLOCK_N, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 2)
    halves = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe[:BLOCK_N].contiguous(), 2),
                        torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe[BLOCK_N:].contiguous(), 2)])
    if not torch.equal(packed, halves):  # column blocks must pack independently (we pack in chunks)
        return None
    for layout in ("split", "pairs"):
        if torch.equal(_unpack_blocks(packed.view(2, 64, BLOCK_N // 2), layout).transpose(1, 2).reshape(
                2 * BLOCK_N, 64).to(torch.int32), probe):
            return layout
    return None


def _unpack_blocks(blocks: torch.Tensor, layout: str) -> torch.Tensor:
    """Packed bytes (blocks, K, 32) to 4-bit values (blocks, K, 64) in column order (uint8)."""
    low, high = blocks & 15, blocks >> 4
    if layout == "split":
        return torch.cat([low, high], dim=-1)
    return torch.stack([low, high], dim=-1).reshape(*blocks.shape[:-1], BLOCK_N)


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
    scales = torch.zeros(k // op_group, padded_n, dtype=layer.scales.dtype)
    zeros = torch.full((k // op_group, padded_n), 8, dtype=torch.uint8)
    offset = 8 - 2 ** (layer.bits - 1)  # 2-bit values 0..3 become 6..9: centred on the op's 8
    step = column_step(k, BLOCK_N)
    for start in range(0, n, step):
        stop = min(start + step, n)
        intweight, _ = layer.integer_columns(start, stop)  # (in, c)
        padded_stop = min(start + step, padded_n)
        values = torch.full((padded_stop - start, k), 8, dtype=torch.int32)
        values[: stop - start] = intweight.t() + offset
        packed[start:padded_stop] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2)
        group_zeros, group_scales = op_group_params(layer, op_group, start, stop)  # (op groups, c)
        group_zeros = group_zeros + offset  # the zero of the shifted values
        scales_and_zeros[:, start:stop, 0] = group_scales.to(torch.bfloat16)
        scales_and_zeros[:, start:stop, 1] = ((8 - group_zeros) * group_scales).to(torch.bfloat16)
        scales[:, start:stop] = group_scales.to(scales.dtype)
        zeros[:, start:stop] = group_zeros.to(torch.uint8)
    symmetric = bool((zeros == 8).all())
    release_checkpoint_buffers(layer)
    layer.register_buffer("int4_packed", packed, persistent=False)
    layer.register_buffer("int4_scales_and_zeros", scales_and_zeros, persistent=False)
    layer.register_buffer("int4_scales", scales, persistent=False)
    layer.register_buffer("int4_zeros", None if symmetric else zeros, persistent=False)
    layer.int4_group_size = op_group


def forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """bf16 int4 matmul for few tokens; for many, blockwise dequantization plus GEMM (see module docs)."""
    if x.device.type != "cpu":
        raise RuntimeError(f"{layer.name or 'QuantLinear'}: kernel 'cpu-int4' repacked this layer for the CPU; "
                           f"it got input on {x.device} (load the model again for that device)")
    flat = permuted_input(layer, x)  # (tokens, in)
    tokens = flat.shape[0]
    if x.dtype == torch.float32 and tokens >= EXACT_TOKENS:
        out = _prefill_exact(layer, flat)
    elif tokens >= PREFILL_TOKENS:
        out = _prefill_bf16(layer, flat.to(torch.bfloat16))
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), layer.int4_packed,
                                                         layer.int4_group_size, layer.int4_scales_and_zeros)
        out = out[:, : layer.out_features].to(torch.float32)
    if layer.bias is not None:
        out += layer.bias.to(torch.float32)
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


def _blocks(layer: QuantLinear) -> tuple[torch.Tensor, int]:
    blocks = layer.int4_packed.view(-1, layer.in_features, BLOCK_N // 2)  # (N / 64, K, 32)
    return blocks, max(1, PREFILL_BLOCK_ELEMENTS // (layer.in_features * BLOCK_N))


def _prefill_exact(layer: QuantLinear, flat: torch.Tensor) -> torch.Tensor:
    """Exact fp32 ``(q - z) * s`` a few column blocks at a time, each multiplied with the fp32 GEMM."""
    k, groups = layer.in_features, layer.int4_scales.shape[0]
    blocks, per_step = _blocks(layer)
    out = torch.empty(flat.shape[0], blocks.shape[0] * BLOCK_N, dtype=torch.float32)
    layout = packed_layout()
    for first in range(0, blocks.shape[0], per_step):
        last = min(first + per_step, blocks.shape[0])
        cols = slice(first * BLOCK_N, last * BLOCK_N)
        count = last - first
        values = _unpack_blocks(blocks[first:last], layout).to(torch.float32)  # (b, K, 64)
        scales = layer.int4_scales[:, cols].to(torch.float32).reshape(groups, count, BLOCK_N).transpose(0, 1)
        zeros = 8.0 if layer.int4_zeros is None else layer.int4_zeros[:, cols].to(torch.float32).reshape(
            groups, count, BLOCK_N).transpose(0, 1)
        shift = (zeros * scales).neg_()[:, :, None, :]  # (b, groups, 1, 64)
        weight = torch.addcmul(shift, values.view(count, groups, k // groups, BLOCK_N), scales[:, :, None, :])
        product = torch.matmul(flat, weight.reshape(count, k, BLOCK_N))  # (b, tokens, 64)
        out[:, cols] = product.transpose(0, 1).reshape(flat.shape[0], count * BLOCK_N)
    return out[:, : layer.out_features]


@functools.cache
def _byte_table(layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(256, 2) bf16 table byte -> (low - 8, high - 8), and where each table column lands in a 64-block."""
    codes = torch.arange(256)
    table = torch.stack([(codes & 15) - 8, (codes >> 4) - 8], dim=-1).to(torch.bfloat16)
    slot = torch.arange(BLOCK_N)
    order = slot // 2 + (BLOCK_N // 2) * (slot % 2) if layout == "split" else slot
    return table, order


def _prefill_bf16(layer: QuantLinear, flat: torch.Tensor) -> torch.Tensor:
    """bf16 ``(q - 8) * s + zero`` a few column blocks at a time (one table lookup, one multiply-add),
    each multiplied with the bf16 GEMM (AMX/AVX-512-BF16 where the CPU has them)."""
    k = layer.in_features
    sz = layer.int4_scales_and_zeros  # (op groups, N, 2) bf16
    groups = sz.shape[0]
    blocks, per_step = _blocks(layer)
    table, order = _byte_table(packed_layout())
    out = torch.empty(flat.shape[0], blocks.shape[0] * BLOCK_N, dtype=torch.float32)
    for first in range(0, blocks.shape[0], per_step):
        last = min(first + per_step, blocks.shape[0])
        count = last - first
        columns = (torch.arange(first, last)[:, None] * BLOCK_N + order).reshape(-1)  # in lookup order
        values = torch.nn.functional.embedding(blocks[first:last].to(torch.int32), table)  # (b, K, 32, 2)
        params = sz[:, columns].reshape(groups, count, BLOCK_N, 2).transpose(0, 1)  # (b, groups, 64, 2)
        weight = torch.addcmul(params[:, :, None, :, 1], values.view(count, groups, k // groups, BLOCK_N),
                               params[:, :, None, :, 0])
        dense = weight.reshape(count, k, BLOCK_N).permute(1, 0, 2).reshape(k, count * BLOCK_N)  # one 2-D GEMM:
        out[:, columns] = (flat @ dense).to(torch.float32)  # faster than a batched one of 64-column blocks
    return out[:, : layer.out_features]


def workspace_bytes(in_features: int, out_features: int, dtype: torch.dtype) -> int:
    """The prefill block: int32 indices, bf16 values, the dequantized block and its 2-D copy."""
    return PREFILL_BLOCK_ELEMENTS * (2 + 2 + 2 + 2) + PREFILL_BLOCK_ELEMENTS // 2 * 4


register_kernel(QuantKernel(name=NAME, forward=forward, supports=lambda layer, device: unsupported(
    layer, device) is None, workspace_bytes=workspace_bytes, unsupported=unsupported, prepare=prepare))
