"""The full-precision reference stream that ``--method fp-target`` solves against (orchestration, no math).

Next to the quantized model's hidden states (each layer's inputs with every earlier layer quantized) the
driver keeps the full-precision model's hidden states for the same calibration windows. Both go through
the same layer object: its linears keep their original weight tensors here (quantizing a linear assigns
a new tensor, so holding the old one costs nothing extra) and are swapped in for the reference pass
(:func:`original_weights`). Per true-sequential group, each window runs once with the original weights
(the linears' full-precision inputs are recorded) and once as quantized so far (the quantized inputs):
the pairs feed the Hessian and the cross term of :mod:`.fp_target`. After the layer, the reference
stream advances through the layer with its original weights.

Memory: a second set of calibration activations (the size of the first) and, per window, the recorded
inputs of one group; nothing grows with depth. Resume: the reference hidden states are committed with
each layer (``reference-NNNNN.safetensors`` in the work folder, written before ``state.json``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..files.fileio import unlink
from .fp_target import CrossAccumulator
from .gptq import HessianAccumulator
from .group_inputs import group_inputs


def reference_path(work: Path, index: int) -> Path:
    """Where the full-precision inputs of layer ``index`` are committed in the work folder."""
    return work / f"reference-{index:05d}.safetensors"


def original_weights_of(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The current (full-precision) weight tensor of each linear, held before any is quantized."""
    return {name: module.weight.data for name, module in modules.items()}


@contextlib.contextmanager
def original_weights(layer: torch.nn.Module, originals: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run ``layer`` with its linears' original weights; the quantized ones are put back afterwards."""
    current = {name: layer.get_submodule(name).weight.data for name in originals}
    try:
        for name, weight in originals.items():
            layer.get_submodule(name).weight.data = weight
        yield
    finally:
        for name, weight in current.items():
            layer.get_submodule(name).weight.data = weight


def collect_paired(layer: torch.nn.Module, modules: dict[str, torch.nn.Module], *, hidden: Sequence[torch.Tensor],
                   reference: Sequence[torch.Tensor], args: Sequence[tuple[Any, ...]],
                   kwargs: Sequence[dict[str, Any]], originals: dict[str, torch.Tensor], device: torch.device,
                   in_features: Callable[[torch.nn.Module], int]
                   ) -> tuple[dict[str, HessianAccumulator], dict[str, CrossAccumulator]]:
    """Hessians of the quantized inputs and cross terms with the full-precision inputs of ``modules``.

    Each window runs up to the last of ``modules`` twice: from ``reference`` with the original weights,
    recording the full-precision inputs, then from ``hidden`` with the weights quantized so far.
    """
    hessians = {name: HessianAccumulator(in_features(m), device=device) for name, m in modules.items()}
    crosses = {name: CrossAccumulator(in_features(m), device=device) for name, m in modules.items()}
    recorded: dict[str, torch.Tensor] = {}
    pass_name = ["reference"]

    def record(name: str, inputs: torch.Tensor) -> None:
        if pass_name[0] == "reference":
            recorded[name] = inputs.detach()
        else:
            hessians[name].add(inputs)
            crosses[name].add(recorded.pop(name), inputs)

    with group_inputs(modules, record) as run:
        for quantized, full, arg, kwarg in zip(hidden, reference, args, kwargs):
            pass_name[0] = "reference"
            with original_weights(layer, originals):
                run(layer, full.to(device), arg, kwarg)
            pass_name[0] = "quantized"
            run(layer, quantized.to(device), arg, kwarg)
    return hessians, crosses


def save_reference(work: Path, index: int, rows: Sequence[torch.Tensor]) -> None:
    """Commit the full-precision inputs of layer ``index`` (before ``state.json`` records the layer)."""
    from .save import _save_safetensors

    _save_safetensors({"hidden": torch.cat([row.cpu() for row in rows])}, reference_path(work, index))


def load_reference(work: Path, index: int, store: torch.device) -> list[torch.Tensor]:
    """The committed full-precision inputs of layer ``index``, one ``(1, seq, hidden)`` row per window."""
    from safetensors.torch import load_file

    hidden = load_file(str(reference_path(work, index)))["hidden"]
    return [row.unsqueeze(0).to(store) for row in hidden]


def drop_reference(work: Path, index: int) -> None:
    """Remove layer ``index``'s committed reference inputs once the next layer's are committed."""
    unlink(reference_path(work, index), missing_ok=True)
