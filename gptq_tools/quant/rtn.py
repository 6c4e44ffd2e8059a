"""Round-to-nearest quantization: the baseline GPTQ must beat, and the fallback when Cholesky fails."""

from __future__ import annotations

import torch

from ..errors import QuantizationError, UsageError
from .config import QuantizeConfig
from .gptq import QuantResult, output_error
from .scales import group_params, quantize_values


def rtn_quantize(W: torch.Tensor, config: QuantizeConfig, *, H: torch.Tensor | None = None) -> QuantResult:
    """Round each weight to the nearest point of its group's grid (min/max, or MSE-searched).

    Groups are consecutive input columns (``g_idx = i // group_size``); act-order does not apply.

    Args:
        W: weight (out, in).
        config: bits, group size, sym and the checkpoint format (which bounds the zero point).
        H: optional Hessian (in, in); when given, ``error`` is the output error on it, else NaN.

    Returns:
        A :class:`QuantResult` with ``method="rtn"``.

    Raises:
        UsageError: the group size does not divide the inputs.
        QuantizationError: the weight has NaN/inf.
    """
    out_features, in_features = W.shape
    group_size = in_features if config.group_size == -1 else config.group_size
    if in_features % group_size:
        raise UsageError(f"group_size={config.group_size} does not divide the layer's {in_features} inputs; "
                         f"pick a divisor or -1")
    if not torch.isfinite(W).all():
        raise QuantizationError("weight contains NaN or inf; the source checkpoint is damaged")
    weight = W.detach().to(torch.float32)
    groups = in_features // group_size
    grouped = weight.reshape(out_features, groups, group_size).transpose(0, 1)  # (groups, out, gs)
    params = [group_params(block, bits=config.bits, sym=config.sym, zero_min=config.zero_min,
                           scale_search=config.scale_search) for block in grouped]
    scales = torch.stack([p[0] for p in params])  # (groups, out)
    zeros = torch.stack([p[1] for p in params])
    maxq = 2**config.bits - 1
    q = quantize_values(grouped, scales.unsqueeze(2), zeros.unsqueeze(2), maxq)  # (groups, out, gs)
    intweight = q.transpose(0, 1).reshape(out_features, in_features).to(torch.int32)
    g_idx = torch.arange(in_features, device=W.device, dtype=torch.int32) // group_size
    result = QuantResult(intweight=intweight, scales=scales.to(torch.float16), zeros=zeros.to(torch.int32),
                         g_idx=g_idx, error=float("nan"), damp_percent=0.0, method="rtn")
    if H is not None:
        result.error = output_error(weight, result.dequantized(), H.float())
    return result
