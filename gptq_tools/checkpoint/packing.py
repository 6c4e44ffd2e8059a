"""Bit packing of the AutoGPTQ checkpoint format ("gptq" v1, and GPTQModel's "gptq_v2").

Every bit width packs values as one little-endian bit stream in int32 words: value ``k`` of a run
occupies bits ``[k*bits, (k+1)*bits)``, so 4-bit packs 8 values a word and 3-bit spans 3 words per 32
values, exactly as AutoGPTQ's ``qlinear_cuda.pack`` lays them out. ``qweight`` packs along the input
dimension (rows), ``qzeros`` along the output dimension (columns).

Zero points: v1 stores ``zero - 1`` and readers add 1 back (unmasked, as AutoGPTQ's kernels do); v2
stores the zero itself.
"""

from __future__ import annotations

import math

import torch

from ..errors import CheckpointError, UsageError

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _block(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest run that fills whole int32 words."""
    if bits not in SUPPORTED_BITS:
        raise UsageError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")
    common = math.gcd(bits, 32)
    return 32 // common, bits // common


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``values`` (rows, cols), each in ``[0, 2**bits)``, along dim 0 into int32 words.

    Returns an int32 tensor (rows * bits / 32, cols).
    """
    values_per_block, words_per_block = _block(bits)
    rows, cols = values.shape
    if rows % values_per_block:
        raise UsageError(f"cannot pack {rows} rows at {bits} bits: the count must be a multiple of {values_per_block}")
    source = values.to(torch.int64).reshape(rows // values_per_block, values_per_block, cols)
    if source.numel() and (int(source.min()) < 0 or int(source.max()) >= 2**bits):
        raise UsageError(f"values to pack must lie in [0, {2**bits}); got [{int(source.min())}, {int(source.max())}]")
    words = torch.zeros(rows // values_per_block, words_per_block + 1, cols, dtype=torch.int64, device=values.device)
    for k in range(values_per_block):
        bit = k * bits
        word, shift = divmod(bit, 32)
        words[:, word] |= source[:, k] << shift
    # Carry the bits that spilled past 32 into the next word, then drop the spare word.
    for word in range(words_per_block):
        words[:, word + 1] |= words[:, word] >> 32
        words[:, word] &= 0xFFFFFFFF
    packed = words[:, :words_per_block].reshape(rows // values_per_block * words_per_block, cols)
    return _to_int32(packed)


def unpack_rows(packed: torch.Tensor, bits: int, rows: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 (rows*bits/32, cols) to int32 values (rows, cols)."""
    values_per_block, words_per_block = _block(bits)
    word_rows, cols = packed.shape
    if word_rows % words_per_block:
        raise CheckpointError(f"{word_rows} packed rows is not a multiple of {words_per_block} for {bits}-bit data")
    blocks = word_rows // words_per_block
    words = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(blocks, words_per_block, cols)
    words = torch.cat([words, torch.zeros_like(words[:, :1])], dim=1)
    mask = (1 << bits) - 1
    out = torch.empty(blocks, values_per_block, cols, dtype=torch.int64, device=packed.device)
    for k in range(values_per_block):
        word, shift = divmod(k * bits, 32)
        combined = words[:, word] >> shift
        if shift + bits > 32:
            combined = combined | (words[:, word + 1] << (32 - shift))
        out[:, k] = combined & mask
    values = out.reshape(blocks * values_per_block, cols).to(torch.int32)
    return values if rows is None else values[:rows]


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 1 (the layout of ``qzeros``): (rows, cols) to int32 (rows, cols * bits / 32)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, cols: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_cols`."""
    return unpack_rows(packed.t(), bits, cols).t().contiguous()


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret values in [0, 2**32) as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_qweight(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer weights (in, out) to ``qweight`` int32 (in*bits/32, out)."""
    return pack_rows(intweight, bits)


def pack_qzeros(zeros: torch.Tensor, bits: int, *, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Integer zero points (groups, out) to ``qzeros`` int32 (groups, out*bits/32).

    v1 (``"gptq"``) stores ``zero - 1``: a zero of 0 cannot be stored there (AutoGPTQ silently
    corrupted it), so it is refused; quantize with ``sym=True`` or write ``gptq_v2``.
    """
    zeros = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if zeros.numel() and int(zeros.min()) < 1:
            raise UsageError("a zero point of 0 cannot be stored in the v1 'gptq' format; use "
                             "checkpoint_format='gptq_v2' or symmetric quantization")
        zeros = zeros - 1
    elif checkpoint_format != "gptq_v2":
        raise UsageError(f"unknown checkpoint format {checkpoint_format!r}; use one of {CHECKPOINT_FORMATS}")
    return pack_cols(zeros, bits)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, *,
                  checkpoint_format: str = "gptq") -> torch.Tensor:
    """``qzeros`` to integer zero points (groups, out), undoing v1's ``-1`` (unmasked, like AutoGPTQ)."""
    zeros = unpack_cols(qzeros, bits, out_features)
    if checkpoint_format == "gptq":
        return zeros + 1
    if checkpoint_format == "gptq_v2":
        return zeros
    raise UsageError(f"unknown checkpoint format {checkpoint_format!r}; use one of {CHECKPOINT_FORMATS}")


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, *,
               bits: int, checkpoint_format: str = "gptq", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantized weight in ``nn.Linear`` layout (out, in): ``scale[g] * (q - zero[g])`` per input ``i``.

    Args:
        qweight: int32 (in*bits/32, out).
        qzeros: int32 (groups, out*bits/32).
        scales: float (groups, out).
        g_idx: int (in,), the group of each input column.
        bits: 2, 3, 4 or 8.
        checkpoint_format: ``"gptq"`` (v1) or ``"gptq_v2"``.
        dtype: result dtype (default: that of ``scales``).
    """
    out_features = scales.shape[1]
    in_features = g_idx.shape[0]
    intweight = unpack_rows(qweight, bits, in_features)  # (in, out)
    zeros = unpack_qzeros(qzeros, bits, out_features, checkpoint_format=checkpoint_format)  # (groups, out)
    groups = g_idx.to(torch.long)
    weight = (intweight - zeros[groups]).to(torch.float32) * scales[groups].to(torch.float32)  # (in, out)
    return weight.t().contiguous().to(dtype or scales.dtype)
