"""The inputs of a true-sequential group of linears, taken with forward hooks while a layer runs.

Both Hessian collection (plain GPTQ) and fp-target's paired collection run calibration windows through a
decoder layer only as far as the last linear of the group being quantized: the rest of the forward cannot
change what those linears see, so it is cut short.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: ``run(layer, hidden, args, kwargs)``: one window through ``layer``, stopped after the group's last linear.
Runner = Callable[[torch.nn.Module, torch.Tensor, tuple[Any, ...], dict[str, Any]], None]


class _GroupDone(Exception):
    """Raised by the last hook of a group: the rest of the layer's forward is not needed."""


@contextlib.contextmanager
def group_inputs(modules: dict[str, torch.nn.Module],
                 record: Callable[[str, torch.Tensor], None]) -> Iterator[Runner]:
    """Hooks on ``modules`` that hand each one's input to ``record(name, input)``; yields the runner that
    feeds one window and returns once every module of the group has seen it (or the layer's forward ended)."""
    seen: set[str] = set()

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            record(name, inputs[0])
            seen.add(name)
            if len(seen) == len(modules):
                raise _GroupDone
        return hook

    def run(layer: torch.nn.Module, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.clear()
        try:
            with torch.no_grad():
                layer(hidden, *args, **kwargs)
        except _GroupDone:
            pass

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        yield run
    finally:
        for handle in handles:
            handle.remove()
