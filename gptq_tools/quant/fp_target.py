"""The ``fp-target`` method: GPTQ solved against the full-precision model's outputs (pure tensor math).

Plain GPTQ makes each linear reproduce its *own* outputs on the inputs the partly quantized model gives
it: it minimises ``||W X~ - Q X~||^2`` with ``X~`` the quantized model's inputs. Every error the earlier
layers made is then part of ``X~`` and is passed on. The *mismatched* problem (Lybrand and Saab; GPTAQ,
Li et al. arXiv 2504.02692; Qronos, Zhang et al. arXiv 2505.11695) asks each linear to reproduce the
full-precision model's outputs instead, ``W X`` with ``X`` the full-precision model's inputs::

    min_Q ||W X - Q X~||^2

Notation (paper names, as in :mod:`.gptq`): ``W`` (out, in) the full-precision weight, ``H = 2/N X~ X~^T``
(in, in) the Hessian of the quantized inputs (the same one plain GPTQ uses), ``D = 2/N (X - X~) X~^T``
(in, in) the cross term, GPTAQ's ``dXXT``. Expanding the square, the objective is
``tr((Q - Wt) H (Q - Wt)^T) / 2`` plus a constant, where ``Wt`` is the least-squares solution
``W X X~^T (X~ X~^T)^-1 = W + W D H^-1``. So the mismatched problem is plain GPTQ's problem with the
target ``Wt`` in place of ``W``: the same greedy column loop, Cholesky factor, groups and act-order,
only the weight it approximates changes. The inverse uses the damped ``H + lambda I``, which makes ``Wt``
the ridge solution pulled towards ``W`` (``argmin ||W X - V X~||^2 + lambda ||V - W||^2``), as in
Qronos' implementation; ``target_alpha`` (``alpha``) scales the correction
(``Wt = W + alpha W D (H + lambda I)^-1``; GPTAQ's default is 0.25, 1 is the full solution).

Qronos rounds the first column from a coordinate-wise update and then runs GPTQ's updates on ``H``;
GPTAQ spreads the correction column by column (an upper-triangular ``P``); here it is applied to the
whole weight before the loop, so static groups are found on the corrected weight and the solver is
:mod:`.gptq`'s, unchanged. The output format is unchanged: integers, scales, zeros and ``g_idx``.
"""

from __future__ import annotations

import torch

from ..errors import QuantizationError, UsageError
from .config import QuantizeConfig
from .gptq import QuantResult, _inverse_hessian, _prepare, _solve, _static_params, add_window, output_error, take_mean


class CrossAccumulator:
    """Sum of ``(x - x~) x~^T`` over paired rows (full-precision ``x``, quantized ``x~``) and the row count;
    divided once, summed window by window in fp64 and reduced across ranks like
    :class:`~.gptq.HessianAccumulator`, so one process and any number of ranks get the same bits."""

    def __init__(self, in_features: int, *, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, reference: torch.Tensor, inputs: torch.Tensor) -> None:
        """Add one window's paired rows of shape (..., in): ``reference`` from the full-precision model,
        ``inputs`` from the quantized one (the same tokens in the same order)."""
        if reference.shape != inputs.shape:
            raise QuantizationError(f"full-precision inputs {tuple(reference.shape)} and quantized inputs "
                                    f"{tuple(inputs.shape)} do not pair up; the two streams went out of step")
        rows = inputs.reshape(-1, inputs.shape[-1]).to(device=self.sum.device, dtype=torch.float32)  # (n, in)
        full = reference.reshape(-1, reference.shape[-1]).to(device=self.sum.device, dtype=torch.float32)
        delta = full - rows  # (n, in): x - x~, a new tensor (the caller's inputs stay untouched)
        add_window(self.sum, delta, rows)
        self.count += rows.shape[0]

    def cross(self) -> torch.Tensor:
        """``D = 2/N sum (x - x~) x~^T`` (fp32, in x in); the accumulator is used up (its fp64 sum freed).

        Raises:
            QuantizationError: no rows were added, or the cross term was already taken.
        """
        if self.count <= 0:
            raise QuantizationError("no paired calibration rows reached this linear (or its cross term was "
                                    "already taken); check the calibration data")
        return take_mean(self)


def corrected_target(W: torch.Tensor, D: torch.Tensor, Hinv: torch.Tensor, perm: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """``Wt = W + alpha W D (H + lambda I)^-1`` in permuted column order, fp32 (out, in).

    ``Hinv`` is the upper Cholesky factor ``U`` of the damped inverse in permuted order
    (``(H + lambda I)^-1 = U^T U``), so no second factorisation is needed.
    """
    W = W.to(torch.float32)
    WD = (W @ D.to(torch.float32))[:, perm]  # (out, in), permuted columns
    correction = (WD @ Hinv.t()) @ Hinv  # (out, in)
    return W[:, perm] + alpha * correction


def fp_target_quantize(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, config: QuantizeConfig, *,
                       name: str = "linear") -> tuple[QuantResult, torch.Tensor]:
    """Quantize one linear against the full-precision outputs.

    Args:
        W: full-precision weight (out, in), any float dtype.
        H: Hessian of the quantized inputs (in, in), ``2/N sum x~ x~^T``.
        D: cross term (in, in), ``2/N sum (x - x~) x~^T`` (:class:`CrossAccumulator`).
        config: as for :func:`~.gptq.gptq_quantize`, plus ``target_alpha``.
        name: used in log lines and errors.

    Returns:
        (the :class:`~.gptq.QuantResult` with ``method="fp-target"``, the corrected target ``Wt`` (out, in) in
        the original column order). ``error`` is ``tr((Wt - Q) H (Wt - Q)^T) / 2``: the part of the output
        error against the full-precision layer that the choice of ``Q`` can change.

    Raises:
        UsageError: shapes disagree, or the group size does not divide the inputs.
        QuantizationError: the weight or ``D`` has NaN/inf.
        CholeskyFailure: H cannot be inverted at any dampening (callers fall back to RTN).
    """
    if D.shape != H.shape:
        raise UsageError(f"{name}: cross term shape {tuple(D.shape)} does not match the Hessian {tuple(H.shape)}")
    if not torch.isfinite(D).all():
        raise QuantizationError(f"{name}: the full-precision/quantized cross term has NaN or inf; the "
                                f"full-precision activations overflowed (quantize in float32)")
    _, dead, perm = _prepare(W, H, config)  # validation, dead inputs, act-order
    Hinv, damp = _inverse_hessian(H, dead, perm, config, name=name)  # (in, in), permuted
    target = corrected_target(W, D, Hinv, perm, config.target_alpha)  # (out, in), permuted
    target[:, dead[perm]] = 0  # inputs the quantized model never feeds: any weight there is as good
    invperm = torch.argsort(perm)
    unpermuted = target[:, invperm]
    static = _static_params(unpermuted, config)
    Q, scales, zeros, g_idx = _solve(target, Hinv, perm, static, config)
    del Hinv
    result = QuantResult(intweight=Q[:, invperm].to(torch.int32), scales=scales.to(torch.float16),
                         zeros=zeros.to(torch.int32), g_idx=g_idx[invperm].to(torch.int32), error=0.0,
                         damp_percent=damp, method="fp-target")
    result.error = output_error(unpermuted, result.dequantized(), H)
    return result, unpermuted
