"""Quantization settings: one frozen dataclass, validated once, serialised with ``asdict``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import UsageError
from ..packing import CHECKPOINT_FORMATS, SUPPORTED_BITS


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize (the fields that end up in ``quantize_config.json`` plus the solver's knobs).

    Attributes:
        bits: 2, 3, 4 or 8.
        group_size: inputs sharing one scale/zero; -1 means one group per output row.
        desc_act: act-order: quantize inputs in order of decreasing Hessian diagonal.
        static_groups: with ``desc_act``, find group parameters on the unpermuted weight first, so the
            checkpoint's ``g_idx`` stays monotonic (fast kernels) while keeping act-order's accuracy.
        sym: symmetric quantization (zero fixed at the middle of the range).
        damp_percent: dampening added to the Hessian diagonal, relative to its mean.
        damp_max: the largest dampening tried when Cholesky fails before falling back to RTN.
        block_size: columns per lazy-update block (paper section 3, "lazy batch updates").
        true_sequential: quantize a layer's linears group by group, each seeing its predecessors quantized.
        checkpoint_format: ``"gptq"`` (v1, default) or ``"gptq_v2"``. v1 stores ``zero - 1`` and so
            cannot hold a zero of 0; for asymmetric v1 output the quantizer keeps every zero >= 1 (it
            searches the grid with the zero clamped, so the stored values are exact, at the cost of a
            sliver of range for all-positive groups). ``gptq_v2`` has no such limit, and is what
            GPTQModel needs for asymmetric checkpoints (it refuses asymmetric v1 from other producers).
    """

    bits: int = 4
    group_size: int = 128
    desc_act: bool = True
    static_groups: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    damp_max: float = 1.0
    block_size: int = 128
    true_sequential: bool = True
    checkpoint_format: str = "gptq"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise UsageError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size < 1:
            raise UsageError(f"group_size={self.group_size} is invalid; use -1 (no grouping) or a positive divisor "
                             f"of every layer's input size (e.g. 128)")
        if not 0.0 <= self.damp_percent <= 1.0 or not self.damp_percent <= self.damp_max:
            raise UsageError(f"damp_percent={self.damp_percent} must lie in [0, damp_max={self.damp_max}]")
        if self.block_size < 1:
            raise UsageError(f"block_size={self.block_size} must be positive")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise UsageError(f"checkpoint_format={self.checkpoint_format!r} is unknown; "
                             f"use one of {CHECKPOINT_FORMATS}")

    @property
    def zero_min(self) -> int:
        """Smallest zero point the output format can store (1 for asymmetric v1, else 0)."""
        return 1 if (self.checkpoint_format == "gptq" and not self.sym) else 0

    def quantize_config_dict(self, *, model_name_or_path: str | None, model_file_base_name: str) -> dict[str, Any]:
        """The ``quantize_config.json`` / ``config.json["quantization_config"]`` dict (AutoGPTQ keys)."""
        return {
            "bits": self.bits, "group_size": self.group_size, "damp_percent": self.damp_percent,
            "desc_act": self.desc_act, "static_groups": self.static_groups, "sym": self.sym,
            "true_sequential": self.true_sequential, "model_name_or_path": model_name_or_path,
            "model_file_base_name": model_file_base_name, "quant_method": "gptq",
            "checkpoint_format": self.checkpoint_format,
        }

    def to_dict(self) -> dict[str, Any]:
        """All fields, for state files and reports."""
        return asdict(self)
