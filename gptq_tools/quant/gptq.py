"""GPTQ: pure tensor math (no hooks, no models, no files).

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(arXiv 2210.17323). Paper names are used inside the solver: ``W`` (out, in) weight, ``H`` (in, in)
Hessian ``2/N sum x x^T``, ``Hinv`` the upper Cholesky factor of its inverse (section 3, "Cholesky
reformulation"), ``i1/i2`` the lazy-update block (section 3, "lazy batch updates"), ``Err`` the scaled
errors of a block.

Group parameters are found on the error-updated columns when a group starts (dynamic groups) or up
front on the original weight (static groups); a group that starts inside a block and runs past its end
sees exactly the columns a column-by-column solver would (the pending block update is applied to those
columns first), so the blocked solver equals :func:`gptq_reference` up to float rounding.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from ..errors import QuantizationError, UsageError
from .config import QuantizeConfig
from .scales import find_params, group_params, quantize_values

__all__ = ["CholeskyFailure", "HessianAccumulator", "QuantResult", "find_params", "gptq_quantize", "gptq_reference",
           "output_error", "quantize_values"]

T = TypeVar("T")

logger = logging.getLogger(__name__)


#: Bounds on one fp32 block of a window's ``x^T x`` (4 and 64 MiB): the block is added to the fp64 sum and freed.
BLOCK_MIN_ELEMENTS = 1 << 20
BLOCK_MAX_ELEMENTS = 1 << 24


def block_rows(width: int) -> int:
    """Rows of a window's product computed at once: an eighth of them (a block the size of 1/16 of the fp64
    sum), at least a 4 MiB block (small layers in one GEMM) and at most a 64 MiB one."""
    rows = max(-(-width // 8), BLOCK_MIN_ELEMENTS // width)
    return max(1, min(rows, BLOCK_MAX_ELEMENTS // width, width))


def add_window(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``total += left^T right``: one calibration window's contribution, the same bits in any run.

    The product is computed in fp32 (full GEMM speed, also on GPUs with slow fp64) a block of rows at a
    time (:func:`block_rows`), and each block is added to the fp64 ``total``. A window's fp32 product
    depends only on that window's rows, and fp64 adds fp32 values exactly unless their exponents span more
    than 29 bits, so the sum of a run's windows does not depend on the order they are added in, nor on how
    they are split over ranks and reduced: one process and ``torchrun`` ranks of any count get the same fp64
    sum, hence the same fp32 Hessian bit for bit. (An fp32 running sum rounds differently for each order;
    fp-target's correction turned those last bits into different 3-bit scales, see
    docs/quantization-methods.md.)

    Args:
        total: fp64 (in, in), updated in place.
        left, right: fp32 (n, in) rows of one window.
    """
    width = left.shape[1]
    step = block_rows(width)
    for start in range(0, width, step):
        stop = min(width, start + step)
        total[start:stop] += left[:, start:stop].t() @ right  # (rows, in) fp32 block, widened exactly


class HessianAccumulator:
    """Sum of ``x x^T`` over calibration rows plus the row count (divide once, at the end).

    Call :meth:`add` once per calibration window: each window's product is fp32, the running sum fp64
    (:func:`add_window`), so the Hessian does not depend on the order of windows or the number of ranks.
    The fp64 sum is twice an fp32 Hessian; :meth:`hessian` turns it into the fp32 one and frees it, so the
    solver's peak (the Hessian and its three working copies) stays the largest moment.
    """

    def __init__(self, in_features: int, *, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add one calibration window's inputs of shape (..., in); every leading index is one row (token)."""
        rows = inputs.reshape(-1, inputs.shape[-1]).to(device=self.sum.device, dtype=torch.float32)  # (n, in)
        add_window(self.sum, rows, rows)
        self.count += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """``H = 2/N sum x x^T`` (fp32, in x in); the accumulator is used up (its fp64 sum freed).

        Raises:
            QuantizationError: no rows were added, or the Hessian was already taken.
        """
        if self.count == 0:
            raise QuantizationError("no calibration rows reached this linear; check the calibration data")
        if self.count < 0:
            raise QuantizationError("this Hessian was already taken; accumulate into a new HessianAccumulator")
        return take_mean(self)


class Summed(Protocol):
    """An accumulator: an fp64 ``sum`` and a row ``count`` (:class:`HessianAccumulator`, fp-target's cross term)."""

    sum: torch.Tensor
    count: int


def take_mean(accumulator: Summed) -> torch.Tensor:
    """``2/N`` times an accumulator's fp64 sum, as fp32; the sum is freed and the accumulator used up."""
    total = accumulator.sum.mul_(2.0 / accumulator.count)  # in place: no second fp64 buffer
    accumulator.sum = torch.empty(0, dtype=torch.float64, device=total.device)
    accumulator.count = -1
    return total.to(torch.float32)  # the fp64 sum is freed with ``total`` on return


@dataclass
class QuantResult:
    """What quantizing one linear produced.

    Attributes:
        intweight: int32 (out, in), each in ``[0, 2**bits)``.
        scales: fp16 (groups, out).
        zeros: int32 (groups, out), the true zero points (not v1-shifted).
        g_idx: int32 (in,), the group of each input column.
        error: mean squared output error per calibration row, ``tr(dW H dW^T) / 2`` with the undamped H.
        damp_percent: the dampening finally used (0 for RTN).
        method: ``"gptq"``, ``"fp-target"``, or ``"rtn"`` when round-to-nearest was used.
    """

    intweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    error: float
    damp_percent: float
    method: str

    def dequantized(self) -> torch.Tensor:
        """The weight the checkpoint reconstructs, fp32 (out, in)."""
        groups = self.g_idx.long()
        scales = self.scales.float()[groups].t()  # (out, in)
        zeros = self.zeros[groups].t()  # (out, in)
        return scales * (self.intweight - zeros).float()


class CholeskyFailure(QuantizationError):
    """The Hessian stayed non positive-definite even at the largest dampening."""


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(dW H dW^T) / 2``: the mean squared output error per row, ``H = 2/N sum x x^T``."""
    delta = (W - Q).float()  # (out, in)
    return float(((delta @ H.to(torch.float32)) * delta).sum() / 2)


# ---------------------------------------------------------------------------------------------------
# preparation shared by the blocked solver and the reference


def _prepare(W: torch.Tensor, H: torch.Tensor,
             config: QuantizeConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate; zero dead inputs; return (W fp32 (out, in), dead mask (in,), perm (in,)).

    H is not copied here: at BLOOM-176B's 57344 inputs one fp32 copy is 13 GB, so the solver makes
    exactly one permuted, damped working copy (see :func:`_inverse_hessian`).
    """
    in_features = W.shape[1]
    if H.shape != (in_features, in_features):
        raise UsageError(f"Hessian shape {tuple(H.shape)} does not match weight inputs {in_features}")
    group_size = config.group_size
    if group_size != -1 and in_features % group_size:
        raise UsageError(f"group_size={group_size} does not divide the layer's {in_features} inputs; "
                         f"pick a divisor or -1")
    if not torch.isfinite(W).all():
        raise QuantizationError("weight contains NaN or inf; the source checkpoint is damaged")
    W = W.detach().to(torch.float32).clone()
    diag = torch.diag(H).to(torch.float32)  # a copy: (in,)
    dead = diag == 0
    diag[dead] = 1  # dead inputs get H_ii = 1 (paper's trick); their weights are zeroed
    W[:, dead] = 0
    if config.desc_act:
        perm = torch.argsort(diag, descending=True, stable=True)
    else:
        perm = torch.arange(in_features, device=W.device)
    return W, dead, perm


def _working_hessian(H: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """fp32 ``H`` with dead diagonal entries set to 1, rows and columns permuted: a fresh tensor."""
    work = H.to(torch.float32).index_select(0, perm).index_select(1, perm)  # (in, in)
    dead_positions = torch.nonzero(dead[perm]).flatten()
    work[dead_positions, dead_positions] = 1
    return work


def _group_params(W: torch.Tensor, config: QuantizeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of one group (out, cols), by the configured scale search."""
    return group_params(W, bits=config.bits, sym=config.sym, zero_min=config.zero_min,
                        scale_search=config.scale_search)


def _static_params(W: torch.Tensor, config: QuantizeConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Group parameters found up front on the unpermuted weight: (scales, zeros) each (groups, out)."""
    group_size = W.shape[1] if config.group_size == -1 else config.group_size
    if config.group_size != -1 and not config.uses_static_groups:
        return None
    grouped = W.reshape(W.shape[0], W.shape[1] // group_size, group_size).transpose(0, 1)  # (groups, out, gs)
    params = [_group_params(block, config) for block in grouped]
    return torch.stack([p[0] for p in params]), torch.stack([p[1] for p in params])


def _one_thread(function: Callable[..., T]) -> Callable[..., T]:
    """Run ``function`` with one intra-op thread: MKL's threaded Cholesky rounds differently for each thread
    count (measured: ``cholesky`` of the same matrix with 1 and 2 threads differs), and the checkpoint's
    bytes must not depend on ``--threads``. The factorizations are a small part of a layer's time."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@_one_thread
def _inverse_hessian(H: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor, config: QuantizeConfig, *,
                     name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp)^-1`` in permuted order, raising damp (x2, up to ``damp_max``).

    Peak memory is three (in, in) fp32 tensors besides the caller's H: the working copy, then L, then
    its inverse, then the result, each freed as soon as the next exists.

    Raises:
        CholeskyFailure: no dampening up to ``damp_max`` makes H positive definite.
    """
    damp = config.damp_percent
    while True:
        work = _working_hessian(H, dead, perm)
        diagonal = work.diagonal()
        diagonal += damp * float(torch.mean(diagonal))
        L, info = torch.linalg.cholesky_ex(work)
        del work, diagonal
        if int(info) == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            Hinv, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and torch.isfinite(Hinv).all():
                if damp != config.damp_percent:
                    logger.warning("%s: Cholesky needed damp_percent %.4g (asked %.4g)", name, damp,
                                   config.damp_percent)
                return Hinv, damp
        if damp >= config.damp_max:
            raise CholeskyFailure(f"{name}: Hessian is not positive definite even with damp_percent={damp:.4g}")
        damp = min(config.damp_max, damp * 2 if damp > 0 else 0.01)


# ---------------------------------------------------------------------------------------------------
# the solver


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, config: QuantizeConfig, *, name: str = "linear") -> QuantResult:
    """Quantize one linear with GPTQ.

    Args:
        W: weight (out, in), any float dtype.
        H: Hessian (in, in), ``2/N sum x x^T`` (see :class:`HessianAccumulator`).
        config: bits, group size, act-order, static groups, sym, damp, block size.
        name: used in log lines and errors.

    Returns:
        A :class:`QuantResult`.

    Raises:
        UsageError: the group size does not divide the inputs, or shapes disagree.
        QuantizationError: the weight has NaN/inf.
        CholeskyFailure: H cannot be inverted at any dampening (callers fall back to RTN).
    """
    W_orig = W
    W, dead, perm = _prepare(W, H, config)
    static = _static_params(W, config)
    Hinv, damp = _inverse_hessian(H, dead, perm, config, name=name)  # (in, in), permuted
    W = W[:, perm]  # (out, in), permuted
    Q, scales, zeros, g_idx = _solve(W, Hinv, perm, static, config)
    invperm = torch.argsort(perm)
    Q = Q[:, invperm]
    g_idx = g_idx[invperm]
    intweight = Q.to(torch.int32)
    result = QuantResult(intweight=intweight, scales=scales.to(torch.float16), zeros=zeros.to(torch.int32),
                         g_idx=g_idx.to(torch.int32), error=0.0, damp_percent=damp, method="gptq")
    result.error = output_error(W_orig.float(), result.dequantized(), H)
    return result


def _solve(W: torch.Tensor, Hinv: torch.Tensor, perm: torch.Tensor, static: tuple[torch.Tensor, torch.Tensor] | None,
           config: QuantizeConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocked column loop on permuted ``W``; returns (Q ints (out, in) permuted, scales, zeros, g_idx permuted)."""
    columns = W.shape[1]
    maxq = 2**config.bits - 1
    gs = columns if config.group_size == -1 else config.group_size
    dynamic = static is None
    Q = torch.zeros_like(W)  # (out, in) grid integers, permuted order
    g_idx = torch.empty(columns, dtype=torch.int64, device=W.device)
    new_scales: list[torch.Tensor] = []
    new_zeros: list[torch.Tensor] = []
    scale = zero = torch.empty(0)
    for i1 in range(0, columns, config.block_size):
        i2 = min(i1 + config.block_size, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # (out, count)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            column = i1 + i
            if dynamic:
                if column % gs == 0:
                    group_cols = W1[:, i:i + gs]
                    if column + gs > i2:  # the group runs past this block: apply the pending update first
                        tail = W[:, i2:column + gs] - Err1 @ Hinv[i1:i2, i2:column + gs]
                        group_cols = torch.cat([group_cols, tail], dim=1)
                    scale, zero = _group_params(group_cols, config)
                    new_scales.append(scale)
                    new_zeros.append(zero)
                g_idx[column] = column // gs
            else:
                group = int(perm[column]) // gs
                scale, zero = static[0][group], static[1][group]
                g_idx[column] = group
            w = W1[:, i]  # (out,)
            d = Hinv1[i, i]
            q = quantize_values(w, scale, zero, maxq)
            Q[:, column] = q
            err = (w - scale * (q - zero)) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if dynamic:
        return Q, torch.stack(new_scales), torch.stack(new_zeros), g_idx
    return Q, static[0], static[1], g_idx


def gptq_reference(W: torch.Tensor, H: torch.Tensor, config: QuantizeConfig) -> QuantResult:
    """Plain column-by-column GPTQ (no lazy blocks, no tricks): the oracle the tests compare against.

    Each column is quantized, its error spread over all remaining columns at once, and a dynamic group's
    parameters are found on the fully updated columns.
    """
    W_orig = W
    W, dead, perm = _prepare(W, H, config)
    Hp = _working_hessian(H, dead, perm)
    Hp = Hp + config.damp_percent * torch.mean(torch.diag(Hp)) * torch.eye(Hp.shape[0], dtype=Hp.dtype)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(Hp), upper=True)
    static = _static_params(W, config)
    W = W[:, perm]
    maxq = 2**config.bits - 1
    columns = W.shape[1]
    gs = columns if config.group_size == -1 else config.group_size
    Q = torch.zeros_like(W)
    g_idx = torch.empty(columns, dtype=torch.int64)
    scales, zeros = [], []
    for j in range(columns):
        if static is None:
            if j % gs == 0:
                scale, zero = _group_params(W[:, j:j + gs], config)
                scales.append(scale)
                zeros.append(zero)
            g_idx[j] = j // gs
        else:
            g_idx[j] = int(perm[j]) // gs
            scale, zero = static[0][g_idx[j]], static[1][g_idx[j]]
        q = quantize_values(W[:, j], scale, zero, maxq)
        Q[:, j] = q
        err = (W[:, j] - scale * (q - zero)) / Hinv[j, j]
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
    invperm = torch.argsort(perm)
    if static is None:
        scale_t, zero_t = torch.stack(scales), torch.stack(zeros)
    else:
        scale_t, zero_t = static
    result = QuantResult(intweight=Q[:, invperm].to(torch.int32), scales=scale_t.to(torch.float16),
                         zeros=zero_t.to(torch.int32), g_idx=g_idx[invperm].to(torch.int32), error=0.0,
                         damp_percent=config.damp_percent, method="gptq")
    result.error = output_error(W_orig.float(), result.dequantized(), H)
    return result
