"""Group grid parameters (scale and zero point): min/max, or an MSE search over clipping ranges.

Pure tensor math shared by the solvers (:mod:`.gptq`, :mod:`.fp_target`) and :mod:`.rtn`.

The min/max grid spans each row's whole range, so one outlier stretches the step for every other weight
of the group. The MSE search (``scale_search="mse"``, the ``mse`` option of the original GPTQ code and of
GPTQModel) also tries the range shrunk by 1%, 2%, ... up to ``MSE_MAX_SHRINK`` and keeps, per row, the
candidate whose rounding error ``sum |w - dequant(q(w))| ** MSE_NORM`` is smallest: outliers are clipped
when that costs less than the coarser step would. Both keep the checkpoint format (a scale and an
integer zero per group and output).
"""

from __future__ import annotations

import torch

#: Candidate ranges: the min/max range times ``1 - k / MSE_GRID`` for k = 0 .. MSE_GRID * MSE_MAX_SHRINK - 1.
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
#: The error norm of the search (2.4, as in the original GPTQ code: a little above MSE, so large errors of
#: clipped outliers weigh more than a plain square).
MSE_NORM = 2.4


def find_params(W: torch.Tensor, *, bits: int, sym: bool, zero_min: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero of a min/max grid over ``W`` (out, cols): returns fp32 scale, fp32 zero (out,).

    Scales are rounded to fp16 here, so the solver feeds back exactly the error the checkpoint will have.
    """
    maxq = 2**bits - 1
    xmin = torch.clamp(W.min(dim=1).values, max=0)  # (out,)
    xmax = torch.clamp(W.max(dim=1).values, min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
        if zero_min:
            # Keep zero >= zero_min and widen the scale so the group's maximum still fits the grid.
            zero = torch.clamp(zero, min=zero_min)
            room = torch.clamp(maxq - zero, min=1)
            scale = torch.where(zero < maxq, torch.maximum(scale, xmax / room), scale)
    tiny = torch.finfo(torch.float16).tiny
    scale = torch.clamp(scale, min=tiny).to(torch.float16).to(torch.float32)
    return scale, zero


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer grid values of ``w`` (broadcast against ``scale``/``zero``), clamped to ``[0, maxq]``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def mse_params(W: torch.Tensor, *, bits: int, sym: bool, zero_min: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero minimising the rounding error of ``W`` (out, cols) over shrunk min/max ranges.

    A shrink factor ``p`` scales both ends of the range (``find_params(p * W)``: the min/max of ``p * W``
    are ``p`` times those of ``W``), so every candidate keeps :func:`find_params`'s rules (symmetric zero,
    the v1 zero bound, fp16 scales). ``p = 1`` is the first candidate and wins ties: the result is never
    worse than min/max on this measure.
    """
    maxq = 2**bits - 1
    best_scale, best_zero = find_params(W, bits=bits, sym=sym, zero_min=zero_min)
    best_error = _rounding_error(W, best_scale, best_zero, maxq)  # (out,)
    for step in range(1, int(MSE_GRID * MSE_MAX_SHRINK)):
        shrink = 1 - step / MSE_GRID
        scale, zero = find_params(W * shrink, bits=bits, sym=sym, zero_min=zero_min)
        error = _rounding_error(W, scale, zero, maxq)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _rounding_error(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``sum |w - dequant(q(w))| ** MSE_NORM`` per row of ``W`` (out, cols) on the grid ``scale``/``zero`` (out,)."""
    scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)  # (out, 1)
    dequantized = scale * (quantize_values(W, scale, zero, maxq) - zero)
    return (W - dequantized).abs_().pow_(MSE_NORM).sum(dim=1)


def group_params(W: torch.Tensor, *, bits: int, sym: bool, zero_min: int = 0,
                 scale_search: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of one group ``W`` (out, cols) by ``scale_search`` (``"minmax"`` or ``"mse"``)."""
    if scale_search == "mse":
        return mse_params(W, bits=bits, sym=sym, zero_min=zero_min)
    return find_params(W, bits=bits, sym=sym, zero_min=zero_min)
