"""The quantized linear module and its pluggable kernels.

:class:`QuantLinear` holds a GPTQ linear in the AutoGPTQ checkpoint layout (``qweight``, ``qzeros``,
``scales``, ``g_idx``, optional ``bias`` buffers; v1 ``"gptq"`` or v2 ``"gptq_v2"`` zero points; 2, 3, 4
or 8 bits; any group size). Its forward pass is delegated to a *kernel* picked by name from a registry;
the built-in kernels live in :mod:`gptq_tools.runtime.kernels` (one module each: the pure-PyTorch reference
``"torch"``, our AVX-512 int4 kernel, PyTorch's CPU int4/int8 matmuls, a Triton kernel, PyTorch's CUDA
int4 kernel), and ``kernel="auto"`` picks the fastest that supports a layer on its device. Others register
themselves with :func:`register_kernel`.

Act-order (``desc_act``) checkpoints have a non-monotonic ``g_idx``: input column ``i`` belongs to group
``g_idx[i]`` in no particular order. :meth:`QuantLinear.prepare` sorts the rows by group once at load
time (the packed rows, or the kernel's repacked copy) and keeps the permutation in ``input_perm``; every
forward pass then reorders the *input* once
(one ``index_select``) and each group is a contiguous run of rows, so no per-group gather is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.packing import (
    CHECKPOINT_FORMATS,
    SUPPORTED_BITS,
    pack_rows,
    unpack_qzeros,
    unpack_rows,
)
from ..errors import CheckpointError, UsageError

#: ``QuantLinear(kernel=AUTO_KERNEL)``: pick the fastest kernel per layer and device.
AUTO_KERNEL = "auto"

#: Most weight elements dequantized at once by the torch kernel (bounds its workspace: ~16 bytes each).
DEQUANT_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class QuantKernel:
    """A forward implementation for :class:`QuantLinear`.

    Attributes:
        name: registry key (``QuantLinear(kernel=name)``).
        forward: ``forward(layer, x) -> y``; ``x`` (..., in) in the compute dtype, ``y`` (..., out).
        supports: ``supports(layer, device) -> bool``: whether this kernel can run ``layer`` on ``device``.
        workspace_bytes: ``workspace_bytes(in_features, out_features, dtype) -> int``: the temporary
            device memory one forward call needs beyond its input and output (the planner reserves it).
        unsupported: ``unsupported(layer, device) -> str | None``: why this kernel cannot run ``layer`` on
            ``device`` (None when it can); None derives a generic reason from ``supports``.
        prepare: ``prepare(layer)``, run once before the first forward (after :meth:`QuantLinear.prepare`):
            repacks the checkpoint buffers into the kernel's own form and may drop them. A kernel with a
            ``prepare`` cannot serve modules whose weights are reloaded from disk at every call.
    """

    name: str
    forward: Callable[[QuantLinear, torch.Tensor], torch.Tensor]
    supports: Callable[[QuantLinear, torch.device], bool]
    workspace_bytes: Callable[[int, int, torch.dtype], int]
    unsupported: Callable[[QuantLinear, torch.device], str | None] | None = None
    prepare: Callable[[QuantLinear], None] | None = None

    def why_not(self, layer: QuantLinear, device: torch.device) -> str | None:
        """Why this kernel cannot run ``layer`` on ``device``; None when it can."""
        if self.unsupported is not None:
            return self.unsupported(layer, device)
        return None if self.supports(layer, device) else f"kernel {self.name!r} does not support this layer"


_KERNELS: dict[str, QuantKernel] = {}


def register_kernel(kernel: QuantKernel, *, replace: bool = False) -> None:
    """Make ``kernel`` available under ``kernel.name``.

    Raises:
        UsageError: a kernel of that name exists and ``replace`` is False.
    """
    if kernel.name in _KERNELS and not replace:
        raise UsageError(f"a quantized-linear kernel named {kernel.name!r} is already registered; "
                         f"pass replace=True to override it")
    _KERNELS[kernel.name] = kernel


def get_kernel(name: str) -> QuantKernel:
    """The registered kernel called ``name``.

    Raises:
        UsageError: no such kernel (the message lists the registered ones).
    """
    try:
        return _KERNELS[name]
    except KeyError:
        raise UsageError(f"unknown quantized-linear kernel {name!r}; registered kernels: "
                         f"{', '.join(available_kernels())}") from None


def available_kernels() -> list[str]:
    """Names of all registered kernels, sorted."""
    return sorted(_KERNELS)


#: The function that picks a layer's kernel (:func:`gptq_tools.runtime.kernels.select_kernel`), set by the
#: kernels package when it is imported (``gptq_tools.runtime`` imports it first): this module never imports the
#: kernels, which import it.
_SELECTOR: list[Callable[..., Any]] = []


def set_kernel_selector(selector: Callable[..., Any]) -> None:
    """Install the function :meth:`QuantLinear.select_kernel` asks (the kernels package calls this once)."""
    _SELECTOR[:] = [selector]


class QuantLinear(nn.Module):
    """A GPTQ-quantized ``nn.Linear`` replacement (AutoGPTQ buffer names and shapes).

    Args:
        bits: 2, 3, 4 or 8.
        group_size: inputs per quantization group; -1 means one group for all inputs.
        in_features: inputs; ``in_features * bits`` must be a multiple of 32.
        out_features: outputs; ``out_features * bits`` must be a multiple of 32.
        bias: whether the layer has a bias.
        checkpoint_format: ``"gptq"`` (v1, stored zero minus one) or ``"gptq_v2"``.
        dtype: dtype of ``scales`` and ``bias`` (the compute dtype).
        device: where the buffers are created (``"meta"`` to allocate nothing).
        kernel: name of a registered :class:`QuantKernel`, or ``"auto"``: the fastest kernel that supports
            the layer on the device of its first input (see :func:`gptq_tools.runtime.kernels.select_kernel`).

    Raises:
        UsageError: unsupported bits, format, kernel, or shapes that cannot be packed.
    """

    input_perm: torch.Tensor | None

    def __init__(self, bits: int, group_size: int, in_features: int, out_features: int, *, bias: bool,
                 checkpoint_format: str = "gptq", dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None, kernel: str = "torch") -> None:
        super().__init__()
        check_quant_shape(bits, in_features, out_features, what="QuantLinear")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise UsageError(f"unknown checkpoint format {checkpoint_format!r}; use one of {CHECKPOINT_FORMATS}")
        if kernel != AUTO_KERNEL:
            get_kernel(kernel)
        self.bits, self.in_features, self.out_features = bits, in_features, out_features
        self.group_size = group_size if group_size > 0 else in_features
        self.checkpoint_format, self.kernel, self.name = checkpoint_format, kernel, ""
        shapes = quant_tensor_shapes(bits, group_size, in_features, out_features)
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(shapes["qzeros"], dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(shapes["scales"], dtype=dtype, device=device))
        self.register_buffer("g_idx", torch.zeros(shapes["g_idx"], dtype=torch.int32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_perm", None)
        self.group_counts: tuple[int, ...] | None = None  # rows per group after prepare(); None if uniform
        self.prepared = False
        self.rows_sorted = True  # packed rows are in g_idx order (False between prepare() and sort_packed_rows())
        self.kernel_ready = False  # the kernel's own prepare() has run (its repacked buffers are in place)
        self.kernel_skipped: dict[str, str] = {}  # kernel -> why it was not chosen (filled by select_kernel)

    @property
    def num_groups(self) -> int:
        return math.ceil(self.in_features / self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, format={self.checkpoint_format}, "
                f"act_order={self.input_perm is not None}, kernel={self.kernel!r}")

    @torch.no_grad()
    def prepare(self) -> None:
        """Check ``g_idx`` and, for act-order, order the rows by group once (see module docs).

        Call once after the checkpoint tensors are in place, before the first forward. ``g_idx`` is
        sorted here and the permutation kept in ``input_perm``; the packed rows themselves are sorted
        (in place) only when the chosen kernel reads them packed (:meth:`sort_packed_rows`): kernels that
        repack the weights take the rows in sorted order from :meth:`integer_columns` instead, so a
        memory-mapped ``qweight`` is never written (no private copy of its pages).

        Raises:
            CheckpointError: ``g_idx`` names a group that does not exist.
        """
        groups = self.g_idx.to(torch.long)
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= self.num_groups):
            raise CheckpointError(
                f"{self.name or 'QuantLinear'}.g_idx: groups must lie in [0, {self.num_groups}) for "
                f"in_features={self.in_features}, group_size={self.group_size}; got [{int(groups.min())}, "
                f"{int(groups.max())}]; the checkpoint's group_size does not match its tensors")
        if groups.numel() > 1 and bool((groups[1:] < groups[:-1]).any()):
            perm = torch.argsort(groups, stable=True)
            self.rows_sorted = False
            self.g_idx = self.g_idx[perm].contiguous()
            self.input_perm = perm.to(torch.int32)
            groups = groups[perm]
        counts = torch.bincount(groups, minlength=self.num_groups).tolist()
        uniform = all(c == self.group_size for c in counts[:-1]) and counts[-1] == (
            self.in_features - self.group_size * (self.num_groups - 1))
        self.group_counts = None if uniform else tuple(counts)
        self.prepared = True

    def integer_columns(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer weights (in, c) and zero points (groups, c) of outputs ``[start, stop)``, rows sorted.

        ``start`` and ``stop`` must be multiples of 32 (or ``stop == out_features``). Zeros are the true
        zero points (v1's ``-1`` undone).

        Raises:
            UsageError: a kernel has already repacked the checkpoint buffers and dropped them.
        """
        self._check_checkpoint_buffers()
        word_start, word_stop = start * self.bits // 32, math.ceil(stop * self.bits / 32)
        if 32 % self.bits == 0:  # 2, 4, 8 bits: whole values per word, one shift-and-mask pass
            intweight = _unpack_words(self.qweight[:, start:stop], self.bits, dim=0)[: self.in_features]
            zeros = _unpack_words(self.qzeros[:, word_start:word_stop], self.bits, dim=1)[:, : stop - start]
            if self.checkpoint_format == "gptq":
                zeros = zeros + 1  # v1 stores zero - 1 (added back unmasked, as AutoGPTQ's kernels do)
        else:
            intweight = unpack_rows(self.qweight[:, start:stop], self.bits, self.in_features)  # (in, c)
            zeros = unpack_qzeros(self.qzeros[:, word_start:word_stop], self.bits, stop - start,
                                  checkpoint_format=self.checkpoint_format)  # (groups, c)
        if not self.rows_sorted:
            intweight = intweight[self.input_perm.to(device=intweight.device, dtype=torch.long)]
        return intweight, zeros

    @torch.no_grad()
    def sort_packed_rows(self) -> None:
        """Reorder the packed ``qweight`` rows into sorted (``g_idx``) order in place, once."""
        if not self.rows_sorted:
            self._check_checkpoint_buffers()
            _permute_packed_rows_(self.qweight, self.input_perm.to(torch.long), self.bits, self.in_features)
            self.rows_sorted = True

    def _check_checkpoint_buffers(self) -> None:
        if self.qweight is None:
            raise UsageError(f"{self.name or 'QuantLinear'}: kernel {self.kernel!r} repacked the weights at load; "
                             f"its checkpoint buffers are gone (load with kernel='torch' to read them)")

    def dequantized_columns(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized weight for outputs ``[start, stop)`` as (in, stop - start), rows in sorted order.

        ``start`` and ``stop`` must be multiples of 32 (or ``stop == out_features``).
        """
        intweight, zeros = self.integer_columns(start, stop)
        scales = self.scales[:, start:stop].to(torch.float32)  # (groups, c)
        if self.group_counts is None:
            rows = self.num_groups * self.group_size
            padded = torch.nn.functional.pad(intweight, (0, 0, 0, rows - self.in_features))
            grouped = padded.reshape(self.num_groups, self.group_size, stop - start)
            weight = (grouped - zeros[:, None, :]).to(torch.float32) * scales[:, None, :]
            return weight.reshape(rows, stop - start)[: self.in_features].to(dtype)
        counts = torch.tensor(self.group_counts, device=intweight.device)
        zero_rows = torch.repeat_interleave(zeros, counts, dim=0)
        scale_rows = torch.repeat_interleave(scales, counts, dim=0)
        return ((intweight - zero_rows).to(torch.float32) * scale_rows).to(dtype)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full dequantized weight in ``nn.Linear`` layout (out, in), original input order."""
        self._check_checkpoint_buffers()
        weight = self.dequantized_columns(0, self.out_features, dtype or self.scales.dtype)  # (in, out)
        if self.input_perm is not None:
            restored = torch.empty_like(weight)
            restored[self.input_perm.long()] = weight
            weight = restored
        return weight.t().contiguous()

    def select_kernel(self, device: torch.device | str, *, allow_repack: bool = True) -> str:
        """Resolve ``kernel="auto"`` (or check a named kernel) for ``device`` and run its prepare step.

        Args:
            device: where the layer runs.
            allow_repack: whether kernels that repack the weights may be chosen (False for modules whose
                weights are reloaded from disk at every call).

        Returns:
            The kernel's name (also in ``self.kernel``; skipped kernels and why in ``self.kernel_skipped``).

        Raises:
            UsageError: a named kernel cannot run this layer on ``device`` (the message says why).
        """
        if not self.prepared:
            self.prepare()
        decision = _SELECTOR[0](self, torch.device(device), requested=self.kernel, allow_repack=allow_repack)
        self.kernel, self.kernel_skipped = decision.kernel, dict(decision.skipped)
        prepare = get_kernel(self.kernel).prepare
        if prepare is None:
            self.sort_packed_rows()  # the kernel reads the packed rows as they lie
        elif not self.kernel_ready:
            prepare(self)
        self.kernel_ready = True
        return self.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel_ready:
            self.select_kernel(x.device)
        return get_kernel(self.kernel).forward(self, x)


def _unpack_words(words: torch.Tensor, bits: int, *, dim: int) -> torch.Tensor:
    """Unpack int32 ``words`` holding ``32 // bits`` values each along ``dim`` (0: rows, 1: columns)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    mask = (1 << bits) - 1
    if dim == 0:
        values = (words[:, None, :] >> shifts[None, :, None]) & mask  # (words, per_word, cols)
        return values.reshape(-1, words.shape[1])
    values = (words[:, :, None] >> shifts[None, None, :]) & mask  # (rows, words, per_word)
    return values.reshape(words.shape[0], -1)


def check_quant_shape(bits: int, in_features: int, out_features: int, *, what: str) -> None:
    """Raise :class:`UsageError` when ``bits`` or the shape cannot be packed."""
    if bits not in SUPPORTED_BITS:
        raise UsageError(f"{what}: bits={bits} is not supported; use one of {SUPPORTED_BITS}")
    per_block = 32 // math.gcd(bits, 32)
    for label, size in (("in_features", in_features), ("out_features", out_features)):
        if size <= 0 or size % per_block:
            raise UsageError(f"{what}: {label}={size} cannot be packed at {bits} bits; it must be a positive "
                             f"multiple of {per_block}")


def quant_tensor_shapes(bits: int, group_size: int, in_features: int,
                        out_features: int) -> dict[str, tuple[int, ...]]:
    """Shapes of ``qweight``, ``qzeros``, ``scales`` and ``g_idx`` of one quantized linear (AutoGPTQ layout)."""
    groups = math.ceil(in_features / (group_size if group_size > 0 else in_features))
    return {"qweight": (in_features * bits // 32, out_features),
            "qzeros": (groups, out_features * bits // 32),
            "scales": (groups, out_features),
            "g_idx": (in_features,)}


def _permute_packed_rows_(qweight: torch.Tensor, perm: torch.Tensor, bits: int, in_features: int) -> None:
    """Reorder the unpacked rows of ``qweight`` by ``perm`` in place, a column block at a time.

    In place, so that a memory-mapped ``qweight`` is rewritten where it lies instead of doubled.
    """
    step = _column_chunk(in_features, qweight.shape[1])
    for start in range(0, qweight.shape[1], step):
        values = unpack_rows(qweight[:, start:start + step], bits, in_features)
        qweight[:, start:start + step] = pack_rows(values[perm.to(values.device)], bits)


def _column_chunk(in_features: int, out_features: int) -> int:
    """Outputs per dequantization step: a multiple of 32 keeping the step near DEQUANT_CHUNK_ELEMENTS."""
    step = max(32, DEQUANT_CHUNK_ELEMENTS // max(in_features, 1) // 32 * 32)
    return min(step, out_features)
