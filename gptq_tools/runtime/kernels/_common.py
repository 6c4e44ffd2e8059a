"""Helpers the kernels share: group mapping, integer column chunks, releasing the checkpoint buffers."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..qlinear import DEQUANT_CHUNK_ELEMENTS, QuantLinear


def group_bounds(layer: QuantLinear) -> list[int]:
    """Row offsets where a quantization group starts, after the act-order sort (0 first, in_features last)."""
    if layer.group_counts is None:
        starts = list(range(0, layer.in_features, layer.group_size))
    else:
        starts, offset = [], 0
        for count in layer.group_counts:
            if count:
                starts.append(offset)
            offset += count
    return starts + [layer.in_features]


def uniform_group_size(layer: QuantLinear, allowed: tuple[int, ...]) -> int | None:
    """The largest size in ``allowed`` that tiles every quantization group exactly (None if none does).

    A kernel whose op takes only these group sizes can then run the layer exactly: each op group lies
    inside one quantization group and gets that group's scale and zero (replicated for larger groups).
    """
    bounds = group_bounds(layer)
    common = 0
    for bound in bounds:
        common = math.gcd(common, bound)
    for size in sorted(allowed, reverse=True):
        if common % size == 0:
            return size
    return None


def op_group_params(layer: QuantLinear, op_group: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero points (int32) and scales (fp32) of outputs ``[start, stop)`` per op group of ``op_group`` rows."""
    _, zeros = layer.integer_columns(start, stop)
    groups = layer.g_idx[::op_group].to(torch.long)  # sorted rows: the group of each op group's first row
    scales = layer.scales[:, start:stop].to(torch.float32)
    return zeros[groups], scales[groups]


def integer_column_chunks(layer: QuantLinear, multiple: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(start, stop, intweight, zeros)`` for outputs ``[start, stop)``, in chunks of about
    DEQUANT_CHUNK_ELEMENTS weights whose width is a multiple of ``multiple`` (but for the last): repacking a
    layer this way holds one chunk's integers at a time, never the whole unpacked weight."""
    n, k = layer.out_features, layer.in_features
    step = max(multiple, DEQUANT_CHUNK_ELEMENTS // max(k, 1) // multiple * multiple)
    for start in range(0, n, step):
        stop = min(start + step, n)
        intweight, zeros = layer.integer_columns(start, stop)  # (in, c), (groups, c)
        yield start, stop, intweight, zeros


def release_checkpoint_buffers(layer: QuantLinear) -> None:
    """Drop ``qweight``/``qzeros``/``scales`` once a kernel holds its own copy (frees the mapped pages)."""
    layer.qweight = None
    layer.qzeros = None
    layer.scales = None


def require_cpu_input(layer: QuantLinear, x: torch.Tensor, kernel: str) -> None:
    """A kernel that repacked ``layer`` for the CPU refuses input on another device, saying what to do."""
    if x.device.type != "cpu":
        raise RuntimeError(f"{layer.name or 'QuantLinear'}: kernel {kernel!r} repacked this layer for the CPU; "
                           f"it got input on {x.device} (load the model again for that device)")


def permuted_input(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x`` as (tokens, in) with act-order columns in the sorted row order."""
    flat = x.reshape(-1, layer.in_features)
    if layer.input_perm is not None:
        flat = flat.index_select(1, layer.input_perm.to(device=x.device, dtype=torch.long))
    return flat
