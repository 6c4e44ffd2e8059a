"""CPU decode of a loaded model: what one token at a time needs that a prefill does not.

A decode step multiplies one token by every weight: the native int4 kernel's calls are the work, and each of
PyTorch's own ops around them (norms, rotary embeddings, the cache update, attention over a few hundred
positions) is a few microseconds of work. Run on several threads, each of those ops wakes PyTorch's OpenMP
workers (tens of microseconds on a VM when they sleep, as ``OMP_WAIT_POLICY=PASSIVE`` has them do) for less
work than the wake-up costs. So :func:`install` wraps a CPU model's ``forward``: a call with at most
:data:`DECODE_TOKENS` tokens runs PyTorch's ops on one thread while the native kernel keeps the caller's
thread count on its own pool (:func:`decode_threads`). It also keeps untied fp32 ``nn.Linear`` layers whose
weights are exactly fp16 values (the checkpoint's ``lm_head``) in fp16 (:mod:`.kernels.cpu_half`), and lets
the quantized linears that read one input (the architecture's true-sequential groups: q, k and v; gate and up)
share one native call for few tokens (:class:`~.kernels.cpu_int4_native.SharedInput`).

Measured on the 1B LLaMA-shaped model of ``make bench-cpu-peers`` (2 threads, AMD EPYC, ms per token): see
``docs/kernels.md``. Nothing here changes a result's bits for the native kernels (which thread computes a
column block changes nothing), and PyTorch's ops on one thread differ from two only in their own
summation order, if at all.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..checkpoint.architectures import ArchSpec
from .kernels import cpu_half, cpu_int4_native
from .qlinear import QuantLinear

logger = logging.getLogger(__name__)

#: A forward call with at most this many tokens (batch x positions) is a decode step.
DECODE_TOKENS = 16

_lock = threading.Lock()
_depth = 0
_saved_threads = 1


@contextlib.contextmanager
def decode_threads() -> Iterator[None]:
    """PyTorch's ops on one thread, the native kernels on the caller's count (re-entrant, thread safe)."""
    global _depth, _saved_threads
    with _lock:
        if _depth == 0:
            _saved_threads = torch.get_num_threads()
            cpu_int4_native.set_pool_threads(_saved_threads)
            torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.set_num_threads(_saved_threads)
                cpu_int4_native.set_pool_threads(None)


def _tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2:
        return embeds.numel() // embeds.shape[-1]
    return None


def install(model: nn.Module, arch: ArchSpec | None = None) -> list[str]:
    """Tune a model loaded entirely on the CPU for decode; returns what it changed (for the log).

    Only where a native build runs here and every quantized layer took it; otherwise the model is left as it is.
    """
    found = cpu_int4_native.first_library()
    quantized = [module for module in model.modules() if isinstance(module, QuantLinear)]
    if found is None or not quantized or any(m.kernel not in cpu_int4_native.NAMES for m in quantized):
        return []
    if any(p.device.type != "cpu" for p in model.parameters()) or any(
            b.device.type != "cpu" for b in model.buffers()):
        return []
    changed = _keep_fp16_linears(model, found[1])
    if arch is not None:
        shared = cpu_int4_native.share_inputs(_input_groups(model, arch))
        if shared:
            changed.append(f"{shared} groups of quantized linears that read one input share one call a token")
    forward = model.forward

    @functools.wraps(forward)
    def decode_aware_forward(*args: Any, **kwargs: Any) -> Any:
        tokens = _tokens(args, kwargs)
        if tokens is None or tokens > DECODE_TOKENS:
            return forward(*args, **kwargs)
        with decode_threads():
            return forward(*args, **kwargs)

    model.forward = decode_aware_forward
    changed.append(f"decode steps (up to {DECODE_TOKENS} tokens) run PyTorch's ops on one thread, "
                   f"{found[0].name} on its own pool")
    return changed


def _input_groups(model: nn.Module, arch: ArchSpec) -> list[list[QuantLinear]]:
    """Per decoder layer, each true-sequential group of two or more quantized linears (they read one input)."""
    try:
        layers = model.get_submodule(arch.layers_path)
    except AttributeError:
        return []
    groups = []
    for layer in layers:
        for names in arch.sequential:
            members = [layer.get_submodule(name) for name in names]
            if len(members) > 1 and all(isinstance(m, QuantLinear) for m in members):
                groups.append(members)
    return groups


def _keep_fp16_linears(model: nn.Module, lib: Any) -> list[str]:
    """Swap untied fp32 ``nn.Linear`` layers holding exact fp16 values for :class:`HalfStoredLinear`."""
    shared: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        shared[id(parameter)] = shared.get(id(parameter), 0) + 1
    changed = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or shared.get(id(module.weight), 0) > 1:
            continue
        if not cpu_half.exactly_fp16(module.weight):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child,
                cpu_half.HalfStoredLinear(module, lib))
        changed.append(f"{name}: fp16 weights, fp32 compute")
    return changed
