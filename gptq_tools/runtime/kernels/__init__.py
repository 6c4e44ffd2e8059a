"""The built-in QuantLinear kernels (one module each) and the automatic choice between them.

Every kernel registers itself through :func:`gptq_tools.runtime.qlinear.register_kernel`:

* ``torch`` (:mod:`.reference`): dequantize a block per call and multiply; runs anywhere, the reference;
* ``cpu-int4-avx512``, ``cpu-int4-avx2``, ``cpu-int4-portable`` (:mod:`.cpu_int4_native`): our int4 kernel
  for 2/3/4-bit layers, exact in fp32, three builds of one C source (built at first use) for what the CPU has;
* ``cpu-int4`` (:mod:`.cpu_int4`): PyTorch's CPU int4 matmul for 2/3/4-bit layers (bf16);
* ``cpu-int8`` (:mod:`.cpu_int8`): PyTorch's per-channel int8 matmul for ungrouped 8-bit layers;
* ``unpacked`` (:mod:`.unpacked`): 8-bit values held as uint8, for the 8-bit layers the others refuse;
* ``triton`` (:mod:`.triton_gptq`): our Triton kernel for 2/4/8-bit layers on CUDA;
* ``cuda-int4`` (:mod:`.cuda_int4`): PyTorch's CUDA tinygemm for 2/3/4-bit layers (bf16).

``kernel="auto"`` tries :data:`AUTO_ORDER` for the layer's device type and takes the first that supports
the layer, recording why each earlier one was skipped. Kernels registered from outside run when named
(or when added to :data:`AUTO_ORDER`): auto cannot know how fast they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ...errors import UsageError
from ..qlinear import AUTO_KERNEL, QuantLinear, get_kernel, set_kernel_selector
from . import cpu_int4, cpu_int4_native, cpu_int8, cuda_int4, reference, triton_gptq, unpacked

#: Kernels ``"auto"`` tries, fastest first, per device type (the CPU order is measured by
#: ``scripts/bench_kernels.py``; on CUDA the Triton kernel keeps fp16 activations, tinygemm needs bf16).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": (*cpu_int4_native.NAMES, cpu_int4.NAME, cpu_int8.NAME, unpacked.NAME, reference.NAME),
    "cuda": (triton_gptq.NAME, cuda_int4.NAME, reference.NAME),
}


@dataclass(frozen=True)
class KernelDecision:
    """The kernel one layer got, and why the kernels tried before it were skipped."""

    kernel: str
    skipped: tuple[tuple[str, str], ...] = ()  # (kernel, reason), in the order tried

    def describe(self) -> str:
        """``"cpu-int4"`` or ``"torch (skipped cpu-int4: ...; cpu-int8: ...)"``."""
        if not self.skipped:
            return self.kernel
        return f"{self.kernel} (skipped {'; '.join(f'{name}: {reason}' for name, reason in self.skipped)})"


def select_kernel(layer: QuantLinear, device: torch.device, *, requested: str = AUTO_KERNEL,
                  allow_repack: bool = True) -> KernelDecision:
    """The kernel ``layer`` runs with on ``device``.

    Args:
        layer: a QuantLinear (its ``prepare`` has run, so act-order group sizes are known).
        device: where it runs.
        requested: ``"auto"``, or a kernel name that must be able to run the layer.
        allow_repack: False for modules reloaded from disk at each call: kernels that repack are skipped.

    Raises:
        UsageError: a named kernel cannot run the layer (the message gives its reason).
    """
    if requested != AUTO_KERNEL:
        reason = _reason(requested, layer, device, allow_repack)
        if reason is not None:
            raise UsageError(f"{layer.name or 'QuantLinear'}: kernel {requested!r} is unsupported here: {reason}; "
                             f"use kernel='auto' to pick one that is")
        return KernelDecision(requested)
    skipped: list[tuple[str, str]] = []
    for name in AUTO_ORDER.get(device.type, (reference.NAME,)):
        reason = _reason(name, layer, device, allow_repack)
        if reason is None:
            return KernelDecision(name, tuple(skipped))
        skipped.append((name, reason))
    return KernelDecision(reference.NAME, tuple(skipped))


def _reason(name: str, layer: QuantLinear, device: torch.device, allow_repack: bool) -> str | None:
    kernel = get_kernel(name)
    if kernel.prepare is not None and not allow_repack:
        return "repacks the weights at load, and this module is reloaded from disk at every call"
    return kernel.why_not(layer, device)


def planning_workspace(layer: QuantLinear, kernel: str, device_type: str = "cuda") -> int:
    """Workspace bytes the planner reserves for ``layer`` on a ``device_type`` device.

    For ``"auto"`` it is the workspace of the kernel auto would pick there (from the layer's shape and
    settings); a meta layer is fine.
    """
    name = kernel
    if kernel == AUTO_KERNEL:
        device = torch.device(device_type)
        name = next((n for n in AUTO_ORDER.get(device_type, (reference.NAME,))[:-1]
                     if _planning_reason(n, layer, device) is None), reference.NAME)
    return get_kernel(name).workspace_bytes(layer.in_features, layer.out_features, layer.scales.dtype)


def _planning_reason(name: str, layer: QuantLinear, device: torch.device) -> str | None:
    """Like :func:`_reason`, without asking CUDA about a device this machine may not have (nor building a kernel)."""
    if name == cuda_int4.NAME:
        return None if layer.bits in (2, 3, 4) else "bits"
    if name == triton_gptq.NAME:
        return None if layer.bits in (2, 4, 8) and triton_gptq._triton_importable() else "unavailable"
    if name in cpu_int4_native.BY_NAME:  # planning never runs the compiler: the CPU decides
        return cpu_int4_native.BY_NAME[name].cpu_reason() if layer.bits in (2, 3, 4) else "bits"
    return get_kernel(name).why_not(layer, device)


def summarize(decisions: Mapping[str, KernelDecision]) -> list[str]:
    """One line per distinct decision: how many layers, an example name, the kernel and the skips."""
    groups: dict[KernelDecision, list[str]] = {}
    for name, decision in decisions.items():
        groups.setdefault(decision, []).append(name)
    lines = []
    for decision, names in sorted(groups.items(), key=lambda item: -len(item[1])):
        example = names[0] if len(names) == 1 else f"{names[0]}, ..."
        lines.append(f"{len(names)} layer(s) [{example}]: {decision.describe()}")
    return lines


set_kernel_selector(select_kernel)

__all__ = ["AUTO_ORDER", "KernelDecision", "planning_workspace", "select_kernel", "summarize"]
