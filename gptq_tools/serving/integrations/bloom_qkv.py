"""BLOOM's fused ``query_key_value`` reordered for vLLM, for float and GPTQ tensors alike (torch only).

BLOOM stores the fused QKV outputs as (heads, 3, head_size); vLLM's fused QKV linear wants
(3, heads, head_size). The outputs run along dimension 0 of a float ``weight`` and ``bias``, but along
dimension 1 of GPTQ's ``qweight`` (in/pack, out) and ``scales`` (groups, out), and ``qzeros``
(groups, out/pack) packs several outputs per int32. ``g_idx`` has no output dimension. Used by
:mod:`gptq_tools.serving.integrations.vllm_bloom`; kept apart so that it is tested without vLLM.
"""

from __future__ import annotations

import torch

#: GPTQ tensor suffix -> the dimension that runs over the layer's outputs
_OUTPUT_DIM = {"weight": 0, "bias": 0, "qweight": 1, "scales": 1, "qzeros": 1}


def _reorder_outputs(tensor: torch.Tensor, dim: int, heads: int) -> torch.Tensor:
    """(heads, 3, head_size) -> (3, heads, head_size) along ``dim``."""
    return tensor.unflatten(dim, (heads, 3, -1)).transpose(dim, dim + 1).flatten(dim, dim + 2).contiguous()


def _unpack_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (rows, cols) holding ``32 // bits`` values per word, least significant first -> int64 (rows, cols * n)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    values = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2)


def _pack_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_unpack_columns`."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (values.unflatten(-1, (-1, 32 // bits)) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def repack_qkv_tensor(name: str, tensor: torch.Tensor, *, heads: int, out_features: int) -> torch.Tensor:
    """One ``query_key_value`` tensor of a BLOOM checkpoint in the output order vLLM's fused QKV expects.

    Args:
        name: the checkpoint name (its last component says which GPTQ tensor it is).
        tensor: the tensor as stored.
        heads: attention heads.
        out_features: outputs of the fused linear (3 * hidden size).

    Returns:
        The reordered tensor (``g_idx`` and unknown tensors unchanged).

    Raises:
        ValueError: a ``qzeros`` whose packing is not 2, 4 or 8 bits.
    """
    kind = name.rsplit(".", 1)[-1]
    dim = _OUTPUT_DIM.get(kind)
    if dim is None:
        return tensor
    if kind != "qzeros":
        return _reorder_outputs(tensor, dim, heads)
    per_word, remainder = divmod(out_features, tensor.shape[1])
    bits = 32 // per_word if per_word and not remainder else 0
    if bits not in (2, 4, 8) or 32 % bits:
        raise ValueError(f"{name}: qzeros {tuple(tensor.shape)} for {out_features} outputs is not 2/4/8-bit "
                         f"packing; vLLM loads 4-bit (and, on GPU, 8-bit) GPTQ only")
    values = _reorder_outputs(_unpack_columns(tensor, bits), 1, heads)
    return _pack_columns(values, bits)
