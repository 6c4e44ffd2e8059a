"""``"cpu-int4-avx512"``, ``"cpu-int4-avx2"``, ``"cpu-int4-portable"``: our int4 kernel for 2, 3 and 4 bits,
exact in fp32, in three builds of one C source, chosen by what the CPU reports.

PyTorch's CPU int4 op (:mod:`.cpu_int4`) is fast only with bf16 activations, scales and output (and only
where AVX-512/AMX exist), so its results carry bf16 rounding (2**-9 relative), and its fp32 path is several
times slower than an fp32 ``nn.Linear``. No library ships a CPU int4 matmul that keeps fp32, so this kernel's
loops are ours: ``csrc/int4_gemm.c``, written once with GCC/Clang vector extensions and built by
:mod:`._native` three ways:

=========================  ==========================================  ============================
kernel                     flags                                       runs on
=========================  ==========================================  ============================
``cpu-int4-avx512``        ``-mavx512f -mavx512bw -mavx2 -mfma -mf16c``  x86-64 with AVX-512
``cpu-int4-avx2``          ``-mavx2 -mfma -mf16c``                     x86-64 with AVX2 and FMA
``cpu-int4-portable``      none (SSE2 on x86-64, NEON on aarch64)      any CPU a C compiler targets
=========================  ==========================================  ============================

``kernel="auto"`` tries them in that order; each one the CPU cannot run reports why (``model.gptq_kernels``,
``generate -v``). The CPU's features come from PyTorch's own dispatch (``torch.backends.cpu.
get_cpu_capability()``), so ``ATEN_CPU_CAPABILITY=avx2`` makes an AVX-512 machine act as an AVX2 one here too.

* weights: the 4-bit values, half a byte each, in blocks of ``8 * lanes`` columns (``lanes``: floats a
  vector: 16, 8, 4), as 32-bit words whose nibble ``j`` is column ``l + lanes * j`` of word ``l``'s block, so
  a shift and a mask give ``lanes`` consecutive columns (2- and 3-bit values shifted to the middle of the
  range, zeros with them); scales in fp16 as the checkpoint has them (fp32 where fp16 would
  round them) and zero points in uint8, so a weight is ``(q - z) * s`` in fp32: bit for bit the
  dequantized reference's weight;
* few tokens (decode): per group, ``sum x * (q - z)`` in fp32 FMAs, then times ``s``, several input rows
  at a time over each block of weights (up to 4 for AVX-512, 3 for AVX2, 2 portable), the column blocks
  claimed one at a time by the calling thread and the kernel's own worker threads (``torch.get_num_threads()``
  threads in all; a call never waits for a worker that has not woken up, so a busy machine costs at most one
  block, and idle workers spin for :data:`POOL_SPIN_NS` before they sleep); linears that read one input
  (q, k, v) share one call (:class:`SharedInput`); a lone row (one token) takes
  ``s * (sum x * q - z * sum x)`` instead, every word read once (regrouped, so rounded differently by about
  fp32's epsilon, far below fp16 rounding);
* many tokens (prefill, from :data:`PREFILL_TOKENS`): a block of columns dequantized to fp32 at a time
  and multiplied by PyTorch's fp32 GEMM;
* groups: any size that tiles every quantization group (act-order rows already sorted by
  :meth:`QuantLinear.prepare`), group size -1 as one group.

It needs a C compiler at first use; where none is found every build says so (with what to install) and
``kernel="auto"`` takes ``cpu-int4``.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import platform
from dataclasses import dataclass

import torch

from ... import constants
from ..qlinear import QuantKernel, QuantLinear, register_kernel
from . import _native
from ._common import (
    group_bounds,
    integer_column_chunks,
    op_group_params,
    permuted_input,
    release_checkpoint_buffers,
    require_cpu_input,
)

logger = logging.getLogger(__name__)

SOURCE = "int4_gemm.c"
COMMON_FLAGS = ("-O3", "-std=gnu11", "-ffp-contract=fast", "-fno-math-errno", "-pthread")
#: How long an idle worker of the kernel's thread pool spins before it sleeps: longer than the gaps between the
#: linear layers of a decode step (so the next layer finds it awake), short enough to leave an idle process idle.
POOL_SPIN_NS = 1_000_000
#: From this many tokens per call, blocks are dequantized for the fp32 GEMM instead
#: (``scripts/bench_kernels.py``, "prefill threshold ... (native matmul)" rows: they cross between 128 and 256).
PREFILL_TOKENS = 192
#: Weights dequantized at once on the prefill path (bounds its workspace: 4 bytes each).
PREFILL_BLOCK_ELEMENTS = 1 << 23
#: Smallest group (rows) the kernel takes: smaller ones would make the scales outweigh the weights.
MIN_GROUP_ROWS = 16
#: Below this many weights (times tokens) one thread does the whole call: waking the others costs more than
#: they save there.
THREAD_MIN_ELEMENTS = 1 << 21


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


@dataclass(frozen=True)
class Build:
    """One build of ``csrc/int4_gemm.c``: its kernel name, compiler flags and what the CPU must have."""

    name: str
    isa_flags: tuple[str, ...]
    needs: str | None  #: PyTorch's CPU capability it needs ("AVX512", "AVX2"), None for any CPU
    lanes: int  #: floats a vector (the C source's L): blocks are 8 * lanes columns

    @property
    def flags(self) -> tuple[str, ...]:
        return (*COMMON_FLAGS, *self.isa_flags)

    def cpu_reason(self) -> str | None:
        """Why this CPU cannot run the build (None when it can); never runs the compiler."""
        if self.needs is None:
            return None
        if not _x86():
            return f"needs an x86-64 CPU (this is {platform.machine()})"
        capability = _capability()
        if self.needs == "AVX512" and "AVX512" not in capability:
            return f"needs AVX-512 (PyTorch reports this CPU as {capability})"
        if self.needs == "AVX2" and capability not in ("AVX2", "AVX512"):
            return f"needs AVX2 and FMA (PyTorch reports this CPU as {capability})"
        return None

    def library(self) -> ctypes.CDLL | str:
        """The built library, or why it is unavailable."""
        if constants.native_disabled():
            return "GPTQ_TOOLS_NO_NATIVE is set"
        reason = self.cpu_reason()
        if reason is not None:
            return reason
        return _load(self)


AVX512 = Build("cpu-int4-avx512", ("-mavx512f", "-mavx512bw", "-mavx2", "-mfma", "-mf16c"), "AVX512", 16)
AVX2 = Build("cpu-int4-avx2", ("-mavx2", "-mfma", "-mf16c"), "AVX2", 8)
PORTABLE = Build("cpu-int4-portable", (), None, 4)
#: Fastest first: the order ``kernel="auto"`` tries them in.
BUILDS = (AVX512, AVX2, PORTABLE)
BY_NAME = {build.name: build for build in BUILDS}
NAMES = tuple(build.name for build in BUILDS)


@functools.cache
def _load(build: Build) -> ctypes.CDLL | str:
    lib = _native.load(SOURCE, build.flags)
    if isinstance(lib, str):
        return lib
    lib.gptq_pool_set_spin.argtypes = [ctypes.c_int64]
    lib.gptq_pool_set_spin.restype = None
    lib.gptq_pool_set_spin(POOL_SPIN_NS)
    lib.gptq_int4_gemm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 9
    lib.gptq_int4_gemm.restype = None
    lib.gptq_int4_dequantize.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 8
    lib.gptq_int4_dequantize.restype = None
    lib.gptq_f16_gemm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
    lib.gptq_f16_gemm.restype = None
    lanes = ctypes.c_int32.in_dll(lib, "gptq_int4_lanes").value
    if lanes != build.lanes:  # a compiler that ignored the ISA flags would pack columns this module does not expect
        return f"its library was built for {lanes} lanes, not {build.lanes} ({build_name(lib)} build)"
    return lib


def first_library() -> tuple[Build, ctypes.CDLL] | None:
    """The fastest build this machine runs and its library (None where none does)."""
    for build in BUILDS:
        lib = build.library()
        if not isinstance(lib, str):
            return build, lib
    return None


def build_name(lib: ctypes.CDLL) -> str:
    """The ISA a loaded library was compiled for, as it reports itself ("avx512", "avx2", "portable")."""
    return ctypes.c_char_p.in_dll(lib, "gptq_int4_build").value.decode()


def kernel_group_rows(layer: QuantLinear) -> int:
    """Rows per kernel group: the largest size that tiles every quantization group (all rows for one group)."""
    return functools.reduce(math.gcd, group_bounds(layer), 0)


def unsupported(build: Build, layer: QuantLinear, device: torch.device) -> str | None:
    """Why ``build`` cannot run ``layer`` on ``device`` (None when it can)."""
    if device.type != "cpu":
        return f"runs on the CPU only (this layer runs on {device})"
    if layer.bits not in (2, 3, 4):
        return f"takes values of at most 4 bits; this layer has {layer.bits}"
    rows = kernel_group_rows(layer)
    if rows < MIN_GROUP_ROWS:
        return f"its groups would be {rows} rows (the quantization groups' common divisor); it needs {MIN_GROUP_ROWS}+"
    lib = build.library()
    return lib if isinstance(lib, str) else None


@torch.no_grad()
def prepare(build: Build, layer: QuantLinear) -> None:
    """Pack the sorted values into the build's blocks of ``8 * lanes`` columns (nibble ``j`` of word ``l`` is
    column ``l + lanes * j``), with fp16 scales and uint8 zeros; drop the checkpoint buffers."""
    rows = kernel_group_rows(layer)
    lanes = build.lanes
    block = 8 * lanes
    n, k = layer.out_features, layer.in_features
    padded_n = -(-n // block) * block
    packed = torch.empty(padded_n // block, k, lanes, dtype=torch.int32)
    # fp16 as the checkpoint has them (exact); fp32 where fp16 would round them (scales converted to fp32/bf16)
    exact_in_fp16 = bool((layer.scales.to(torch.float16).to(layer.scales.dtype) == layer.scales).all())
    scale_dtype = torch.float16 if exact_in_fp16 else torch.float32
    scales = torch.zeros(k // rows, padded_n, dtype=scale_dtype)  # padding columns: scale 0, output 0
    zeros = torch.zeros(k // rows, padded_n, dtype=torch.uint8)
    offset = 8 - 2 ** (layer.bits - 1)  # 2-bit values 0..3 become 6..9, their zeros with them
    shifts = torch.arange(0, 32, 4, dtype=torch.int64).view(1, 1, 8, 1)
    for start, stop, intweight, _ in integer_column_chunks(layer, block):  # (in, c)
        width = -(-(stop - start) // block) * block
        values = torch.zeros(k, width, dtype=torch.int64)
        values[:, : stop - start] = intweight + offset
        words = (values.view(k, width // block, 8, lanes) << shifts).sum(dim=2)  # (k, b, lanes) as uint32
        words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
        packed[start // block: (start + width) // block] = words.transpose(0, 1)
        group_zeros, group_scales = op_group_params(layer, rows, start, stop)  # (kernel groups, c)
        scales[:, start:stop] = group_scales.to(scale_dtype)
        zeros[:, start:stop] = (group_zeros + offset).to(torch.uint8)
    release_checkpoint_buffers(layer)
    layer.register_buffer("native_packed", packed, persistent=False)
    # held as their bits (int16 / int32), so that ``model.to(dtype)`` cannot recast them under the kernel
    layer.register_buffer("native_scales", scales.view(torch.int16 if exact_in_fp16 else torch.int32),
                          persistent=False)
    layer.register_buffer("native_zeros", zeros, persistent=False)
    layer.native_group_rows = rows
    layer.native_block = block
    layer.native_shared = None


def forward(build: Build, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ W`` from the packed weights (see the module docs for the two paths).

    Runs once per layer and token in a decode step (7 layers a block): the few-token path does no more in
    Python than the call needs (no conversion an fp32 contiguous input does not need, no slice of an unpadded
    output).
    """
    require_cpu_input(layer, x, build.name)
    lib = _load(build)  # built when the layer was chosen (library()); cached, so no checks on this hot path
    if isinstance(lib, str):
        raise RuntimeError(f"{layer.name or 'QuantLinear'}: kernel {build.name!r} is unavailable: {lib}")
    shared = layer.native_shared
    if shared is not None and x.numel() < PREFILL_TOKENS * layer.in_features:
        return shared.forward(lib, layer, x)
    flat = _flat_fp32(layer, x)
    if flat.shape[0] >= PREFILL_TOKENS:
        out = _dequantized_gemm(lib, layer, flat)
    else:
        out = _gemm(lib, layer, flat)
    return _finish(layer, x, out)


def _flat_fp32(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """``x`` as contiguous fp32 (tokens, in) in the sorted row order (converted or copied only when needed)."""
    flat = permuted_input(layer, x)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    return flat if flat.is_contiguous() else flat.contiguous()


def _finish(layer: QuantLinear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The kernel's fp32 (tokens, padded out) as the layer's output: unpadded, bias added, x's dtype and shape."""
    if out.shape[1] != layer.out_features:
        out = out[:, : layer.out_features]
    if layer.bias is not None:
        out = out + layer.bias.to(torch.float32)
    if x.dtype != torch.float32:
        out = out.to(x.dtype)
    return out.reshape(*x.shape[:-1], layer.out_features)


def _args(layer: QuantLinear) -> tuple[int, int, int, int, int, int]:
    """Pointers to the packed weights, scales and zeros, the padded width, the scales' and zeros' row stride
    (wider than the layer where it shares calls), and whether scales are fp32."""
    scales = layer.native_scales
    return (layer.native_packed.data_ptr(), scales.data_ptr(), layer.native_zeros.data_ptr(), scales.shape[1],
            scales.stride(0), int(scales.dtype == torch.int32))


#: The pool's thread count while PyTorch's own ops run on fewer (:func:`gptq_tools.runtime.decode.decode_threads`);
#: None: PyTorch's count.
_pool_threads: int | None = None


def pool_threads() -> int:
    """Threads the native calls use: PyTorch's count, unless a decode step runs PyTorch's ops on one."""
    return _pool_threads if _pool_threads is not None else torch.get_num_threads()


def set_pool_threads(threads: int | None) -> None:
    """Fix the native calls' thread count (None: follow PyTorch's again)."""
    global _pool_threads
    _pool_threads = threads


def call_threads(elements: int) -> int:
    """Threads for a native call over ``elements`` weights x tokens: :func:`pool_threads`, one for small calls."""
    return pool_threads() if elements >= THREAD_MIN_ELEMENTS else 1


def _gemm(lib: ctypes.CDLL, layer: QuantLinear, flat: torch.Tensor) -> torch.Tensor:
    packed, scales, zeros, n, ldp, scales_f32 = _args(layer)
    k, m = layer.in_features, flat.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    lib.gptq_int4_gemm(packed, scales, zeros, flat.data_ptr(), out.data_ptr(), m, n, ldp, k, layer.native_group_rows, 0,
                       n // layer.native_block, scales_f32, call_threads(k * n * m))
    return out


def _dequantized_gemm(lib: ctypes.CDLL, layer: QuantLinear, flat: torch.Tensor) -> torch.Tensor:
    packed, scales, zeros, n, ldp, scales_f32 = _args(layer)
    k, rows, block = layer.in_features, layer.native_group_rows, layer.native_block
    per_step = max(1, PREFILL_BLOCK_ELEMENTS // (k * block))
    out = torch.empty(flat.shape[0], n, dtype=torch.float32)
    buffer = torch.empty(k * per_step * block, dtype=torch.float32)
    for first in range(0, n // block, per_step):
        last = min(first + per_step, n // block)
        width = (last - first) * block
        weight = buffer[: k * width].view(k, width)
        lib.gptq_int4_dequantize(packed, scales, zeros, weight.data_ptr(), ldp, k, rows, first, last, width, scales_f32,
                                 call_threads(k * width))
        out[:, first * block: last * block] = flat @ weight
    return out


class SharedInput:
    """Quantized linears that read the same input (a true-sequential group: q, k and v; gate and up), computed by
    one native call for few tokens.

    Their packed weights, scales and zeros become slices of one tensor each (no extra memory); the first member
    called with an input computes every member's output and keeps the others' until they are asked for with
    that same tensor, unchanged (same object, same version counter); any other input is computed afresh. One
    call instead of three reads the input once, wakes the pool once and gives its threads more blocks to share.
    Every column is computed as the member's own call would: the same bits.
    """

    def __init__(self, layers: list[QuantLinear]) -> None:
        self.layers = layers
        self.packed = torch.cat([layer.native_packed for layer in layers])
        self.scales = torch.cat([layer.native_scales for layer in layers], dim=1)
        self.zeros = torch.cat([layer.native_zeros for layer in layers], dim=1)
        self.columns: dict[QuantLinear, tuple[int, int]] = {}
        start = 0
        for layer in layers:
            width = layer.native_scales.shape[1]
            blocks = slice(start // layer.native_block, (start + width) // layer.native_block)
            layer.register_buffer("native_packed", self.packed[blocks], persistent=False)
            layer.register_buffer("native_scales", self.scales[:, start: start + width], persistent=False)
            layer.register_buffer("native_zeros", self.zeros[:, start: start + width], persistent=False)
            layer.native_shared = self
            self.columns[layer] = (start, width)
            start += width
        self.width = start
        self._input: torch.Tensor | None = None
        self._version = -1
        self._pending: dict[QuantLinear, torch.Tensor] = {}

    @staticmethod
    def fusable(layers: list[QuantLinear]) -> bool:
        """Whether ``layers`` can share calls: one native build, the same input width, kernel groups, scale
        type and input permutation."""
        first = layers[0]
        if len(layers) < 2 or any(layer.kernel not in BY_NAME or layer.native_shared is not None for layer in layers):
            return False
        same = all(layer.kernel == first.kernel and layer.in_features == first.in_features
                   and layer.native_group_rows == first.native_group_rows
                   and layer.native_scales.dtype == first.native_scales.dtype for layer in layers)
        perms = [layer.input_perm for layer in layers]
        return same and (all(p is None for p in perms) or (
            all(p is not None for p in perms) and all(torch.equal(p, perms[0]) for p in perms)))

    def forward(self, lib: ctypes.CDLL, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if x.is_inference():  # no version counter to tell an unchanged input: each member computes its own
            return _finish(layer, x, _gemm(lib, layer, _flat_fp32(layer, x)))
        if self._input is x and x._version == self._version:
            kept = self._pending.pop(layer, None)
            if not self._pending:
                self._input = None
            if kept is not None:
                return kept
        flat = _flat_fp32(layer, x)
        k, m = layer.in_features, flat.shape[0]
        out = torch.empty(m, self.width, dtype=torch.float32)
        lib.gptq_int4_gemm(self.packed.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr(), flat.data_ptr(),
                           out.data_ptr(), m, self.width, self.width, k, layer.native_group_rows, 0,
                           self.width // layer.native_block, int(self.scales.dtype == torch.int32),
                           call_threads(k * self.width * m))
        outputs = {}
        for member, (start, width) in self.columns.items():
            columns = out[:, start: start + width]
            outputs[member] = _finish(member, x, columns if m == 1 else columns.contiguous())
        mine = outputs.pop(layer)
        self._input, self._version, self._pending = x, x._version, outputs
        return mine


def share_inputs(groups: list[list[QuantLinear]]) -> int:
    """Make each group of linears that read one input share native calls where they can; returns how many."""
    shared = 0
    for layers in groups:
        if SharedInput.fusable(layers):
            SharedInput(layers)
            shared += 1
    return shared


def workspace_bytes(in_features: int, out_features: int, dtype: torch.dtype) -> int:
    """The prefill path's fp32 block of dequantized weights (the decode path needs none)."""
    return min(PREFILL_BLOCK_ELEMENTS, in_features * max(out_features, 8 * AVX512.lanes)) * 4


for _build in BUILDS:
    register_kernel(QuantKernel(
        name=_build.name,
        forward=functools.partial(forward, _build),
        supports=lambda layer, device, build=_build: unsupported(build, layer, device) is None,
        workspace_bytes=workspace_bytes,
        unsupported=functools.partial(unsupported, _build),
        prepare=functools.partial(prepare, _build)))
