"""Quantization settings: one frozen dataclass, validated once, serialised with ``asdict``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..checkpoint.packing import CHECKPOINT_FORMATS, SUPPORTED_BITS
from ..constants import __version__
from ..errors import UsageError

#: Group sizes vLLM's GPTQ kernels (Marlin, and its CPU path) take.
VLLM_GROUP_SIZES = (-1, 32, 64, 128)
#: How the integer weights are chosen (all write the same checkpoint tensors): ``gptq`` (each layer
#: reproduces its own outputs on the quantized model's inputs), ``fp-target`` (each layer reproduces the
#: full-precision model's outputs, correcting the error earlier layers passed on; see :mod:`.fp_target`),
#: ``rtn`` (round-to-nearest, the baseline). ``fp-target`` is the default: it measured better than ``gptq``
#: on every model, bit width and group size benchmarked (docs/quantization-methods.md).
METHODS = ("gptq", "fp-target", "rtn")
#: Group grid parameters: min/max, or the MSE search over clipping ranges (:mod:`.scales`).
SCALE_SEARCHES = ("minmax", "mse")


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize (the fields that end up in ``quantize_config.json`` plus the solver's knobs).

    The defaults (4-bit, group 128, act-order with static groups, symmetric, v1, method fp-target) give a
    checkpoint that transformers, GPTQModel and vLLM (CPU too) all load: static groups keep ``g_idx`` at
    ``i // group_size``, so the checkpoint says ``desc_act: false`` and needs no reordering kernel.

    Attributes:
        bits: 2, 3, 4 or 8.
        group_size: inputs sharing one scale/zero; -1 means one group per output row.
        desc_act: act-order: quantize inputs in order of decreasing Hessian diagonal.
        static_groups: with ``desc_act`` and groups, find group parameters on the unpermuted weight
            first, so the checkpoint's ``g_idx`` stays ``i // group_size`` (no reordering at inference,
            loadable by vLLM) while keeping most of act-order's accuracy. Without ``desc_act`` it has
            no effect: plain GPTQ finds each group's parameters on the error-updated columns.
        sym: symmetric quantization (zero fixed at the middle of the range).
        damp_percent: dampening added to the Hessian diagonal, relative to its mean; in (0, 1), the
            range transformers and GPTQModel accept when they load the checkpoint.
        damp_max: the largest dampening tried when Cholesky fails before falling back to RTN.
        block_size: columns per lazy-update block (paper section 3, "lazy batch updates").
        true_sequential: quantize a layer's linears group by group, each seeing its predecessors quantized.
        method: one of :data:`METHODS`; recorded in ``meta.method``. Default ``"fp-target"``; ``"gptq"`` is
            plain GPTQ.
        target_alpha: ``fp-target`` only: how much of the inherited error to correct, in (0, 1]
            (1: the full least-squares correction; GPTAQ's default is 0.25).
        scale_search: ``"minmax"`` or ``"mse"`` (clipping ranges searched per group and output).
        checkpoint_format: ``"gptq"`` (v1, default) or ``"gptq_v2"``. v1 stores ``zero - 1`` and so
            cannot hold a zero of 0; for asymmetric v1 output the quantizer keeps every zero >= 1 (it
            searches the grid with the zero clamped, so the stored values are exact, at the cost of a
            sliver of range for all-positive groups). ``gptq_v2`` has no such limit, and is what
            GPTQModel needs for asymmetric checkpoints (it refuses asymmetric v1 from other producers).
    """

    bits: int = 4
    group_size: int = 128
    desc_act: bool = True
    static_groups: bool = True
    sym: bool = True
    damp_percent: float = 0.01
    damp_max: float = 1.0
    block_size: int = 128
    true_sequential: bool = True
    checkpoint_format: str = "gptq"
    method: str = "fp-target"
    target_alpha: float = 1.0
    scale_search: str = "minmax"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise UsageError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size < 1:
            raise UsageError(f"group_size={self.group_size} is invalid; use -1 (no grouping) or a positive divisor "
                             f"of every layer's input size (e.g. 128)")
        if not 0.0 < self.damp_percent < 1.0:
            raise UsageError(f"damp_percent={self.damp_percent} is outside (0, 1): transformers and GPTQModel "
                             f"refuse such a checkpoint (\"damp_percent must between 0 and 1\"); use e.g. 0.01")
        if self.damp_percent > self.damp_max:
            raise UsageError(f"damp_percent={self.damp_percent} is above damp_max={self.damp_max}; "
                             f"raise damp_max or lower damp_percent")
        if self.block_size < 1:
            raise UsageError(f"block_size={self.block_size} must be positive")
        if self.method not in METHODS:
            raise UsageError(f"method={self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if not 0.0 < self.target_alpha <= 1.0:
            raise UsageError(f"target_alpha={self.target_alpha} is outside (0, 1]; use 1 for the full correction")
        if self.scale_search not in SCALE_SEARCHES:
            raise UsageError(f"scale_search={self.scale_search!r} is unknown; use one of {', '.join(SCALE_SEARCHES)}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise UsageError(f"checkpoint_format={self.checkpoint_format!r} is unknown; "
                             f"use one of {CHECKPOINT_FORMATS}")

    @property
    def zero_min(self) -> int:
        """Smallest zero point the output format can store (1 for asymmetric v1, else 0)."""
        return 1 if (self.checkpoint_format == "gptq" and not self.sym) else 0

    @property
    def act_order(self) -> str:
        """``"dynamic"`` (groups formed in act-order), ``"static"`` (groups fixed first) or ``"off"``."""
        if not self.desc_act:
            return "off"
        return "static" if self.static_groups or self.group_size == -1 else "dynamic"

    @property
    def uses_static_groups(self) -> bool:
        """Whether the solver fixes group parameters up front (act-order with static groups)."""
        return self.desc_act and self.static_groups and self.group_size != -1

    @property
    def checkpoint_desc_act(self) -> bool:
        """The ``desc_act`` loaders need: true only when ``g_idx`` is not ``i // group_size``.

        Static groups (and group -1, one group per row) keep ``g_idx`` monotonic, so act-order changes
        nothing at inference; writing ``desc_act: true`` there only makes vLLM refuse the checkpoint.
        """
        return self.act_order == "dynamic"

    def quantize_config_dict(self, *, model_name_or_path: str | None, model_file_base_name: str) -> dict[str, Any]:
        """The ``quantize_config.json`` / ``config.json["quantization_config"]`` dict.

        AutoGPTQ's keys, plus ``format`` (what current transformers and GPTQModel write; the legacy
        ``checkpoint_format`` is kept) and GPTQModel's ``meta`` (producer, act-order, static groups,
        dampening, and how the weights were chosen: method, its correction strength, scale search).
        ``desc_act`` is :attr:`checkpoint_desc_act`: what loaders need, not what the
        solver did; ``meta.act_order`` keeps the latter.
        """
        return {
            "bits": self.bits, "group_size": self.group_size, "damp_percent": self.damp_percent,
            "desc_act": self.checkpoint_desc_act, "static_groups": self.uses_static_groups, "sym": self.sym,
            "true_sequential": self.true_sequential, "model_name_or_path": model_name_or_path,
            "model_file_base_name": model_file_base_name, "quant_method": "gptq",
            "format": self.checkpoint_format, "checkpoint_format": self.checkpoint_format,
            "meta": {"quantizer": [f"gptq-tools:{__version__}"], "act_order": self.act_order,
                     "static_groups": self.uses_static_groups, "damp_percent": self.damp_percent,
                     "true_sequential": self.true_sequential, **self.method_meta()},
        }

    def method_meta(self) -> dict[str, Any]:
        """The ``meta`` record of the method: loaders ignore it; it says how the weights were chosen."""
        meta: dict[str, Any] = {"method": self.method, "scale_search": self.scale_search}
        if self.method == "fp-target":
            meta["target_alpha"] = self.target_alpha
        return meta

    def client_warnings(self) -> list[str]:
        """What the loaders would refuse in a checkpoint made with these settings, one line each.

        These are settings that some client refuses while others load them (our loader reads them
        all), so the quantizer warns rather than refuses. The rules are those of transformers 5.24 +
        optimum 2.3 + GPTQModel 7.6 and vLLM 0.32 (see ``scripts/interop.py`` for the matrix).
        """
        warnings = []
        if self.act_order == "dynamic":
            warnings.append(f"act-order with dynamic groups (group size {self.group_size}) is written as "
                            f"desc_act=true, which vLLM refuses (\"GPTQ group activation ordering "
                            f"(desc_act=True) is no longer supported\"); use --static-groups (the default)")
        if not self.sym:
            warnings.append("asymmetric checkpoints are refused by vLLM (\"Unsupported quantization config: "
                            "sym=False\"); use --sym (the default) for vLLM")
            if self.checkpoint_format == "gptq":
                warnings.append("asymmetric v1 is refused by GPTQModel (GPTQModel.load) for any producer but "
                                "GPTQModel (\"Loading of a sym=False model with format=gptq is only supported "
                                "if produced by gptqmodel\"); use --format gptq_v2 for it")
        if self.bits != 4:
            where = "vLLM on CPU" if self.bits == 8 else "vLLM"
            warnings.append(f"{self.bits}-bit checkpoints are refused by {where} (its GPTQ kernels take "
                            f"{'4-bit on CPU, 4/8-bit on GPU' if self.bits == 8 else '4/8-bit symmetric'}); "
                            f"use --bits 4 for vLLM")
        if self.group_size not in VLLM_GROUP_SIZES:
            warnings.append(f"group size {self.group_size} is refused by vLLM (\"Marlin does not support "
                            f"group_size\"; it takes {', '.join(map(str, VLLM_GROUP_SIZES))}); use --group-size 128")
        return warnings

    def to_dict(self) -> dict[str, Any]:
        """All fields, for state files and reports."""
        return asdict(self)
