"""Structural validation of GPTQ checkpoints (AutoGPTQ "gptq" v1 and GPTQModel "gptq_v2" layouts).

Reads only headers, configs and the small ``g_idx`` tensors: checks ``quantize_config.json`` (or
``config.json``'s ``quantization_config``) against every quantized module's tensors (dtypes, shapes of
qweight/qzeros/scales/g_idx for the bits and group size, g_idx range), and that every layer of the
architecture has its quantized linears.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, GptqToolsError
from ..files.safetensors_format import TensorEntry
from .architectures import get_arch
from .model_files import WeightFile, find_checkpoint_files, open_weight_file, read_json, read_quantize_config
from .packing import SUPPORTED_BITS

logger = logging.getLogger(__name__)

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class CheckpointReport:
    """What :func:`validate_checkpoint` found."""

    folder: Path
    files: tuple[WeightFile, ...]
    quantize_config: dict[str, Any]
    model_type: str | None
    modules: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_checkpoint(folder: str | os.PathLike[str], *, raise_on_error: bool = True) -> CheckpointReport:
    """Check a GPTQ checkpoint folder's structure.

    Raises:
        CheckpointError: with ``raise_on_error``, when any problem is found (the first few are named).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; give the checkpoint folder")
    qconfig, _ = read_quantize_config(folder)
    files = find_checkpoint_files(folder, base_name=qconfig.get("model_file_base_name")).files
    config_path = folder / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    report = CheckpointReport(folder, files, qconfig, config.get("model_type"))
    bits, group_size = _check_quantize_config(qconfig, report.problems)
    tensors = {name: (entry, wf) for wf in files for name, entry in wf.header.tensors.items()}
    report.modules = sorted(name[: -len(".qweight")] for name in tensors if name.endswith(".qweight"))
    if bits is not None and group_size is not None:
        for module in report.modules:
            _check_module(module, tensors, bits, group_size, bool(qconfig.get("desc_act")), report.problems)
    _check_layers(config, set(report.modules), report.problems)
    if not report.modules:
        report.problems.append(f"{folder}: no quantized modules (no *.qweight tensors)")
    if report.problems and raise_on_error:
        more = f" (and {len(report.problems) - 1} more problems)" if len(report.problems) > 1 else ""
        raise CheckpointError(f"{folder}: {report.problems[0]}{more}")
    return report


def _check_quantize_config(qconfig: dict[str, Any], problems: list[str]) -> tuple[int | None, int | None]:
    bits, group_size = qconfig.get("bits"), qconfig.get("group_size")
    if type(bits) is not int or bits not in SUPPORTED_BITS:
        problems.append(f"quantize_config: bits={bits!r} is not one of {SUPPORTED_BITS}")
        bits = None
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or group_size > 0):
        problems.append(f"quantize_config: group_size={group_size!r} must be -1 or a positive integer")
        group_size = None
    method = qconfig.get("quant_method", "gptq")
    if method != "gptq":
        problems.append(f"quantize_config: quant_method={method!r}, expected 'gptq'")
    fmt = qconfig.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        problems.append(f"quantize_config: checkpoint_format={fmt!r} is not 'gptq' or 'gptq_v2'")
    return bits, group_size


def _check_module(module: str, tensors: dict[str, tuple[TensorEntry, WeightFile]], bits: int, group_size: int,
                  desc_act: bool, problems: list[str]) -> None:
    qweight = tensors[f"{module}.qweight"][0]
    names = {key: f"{module}.{key}" for key in ("qzeros", "scales", "g_idx")}
    missing = [name for name in names.values() if name not in tensors]
    if missing:
        problems.append(f"{module}: missing tensor(s) {', '.join(missing)}")
        return
    qzeros, scales, g_idx = (tensors[names[k]][0] for k in ("qzeros", "scales", "g_idx"))
    if len(qweight.shape) != 2 or qweight.dtype != "I32":
        problems.append(f"{qweight.name}: expected a 2-D I32 tensor, got {qweight.dtype} {list(qweight.shape)}")
        return
    in_features = qweight.shape[0] * 32 // bits
    out_features = qweight.shape[1]
    groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    expected = {
        qzeros.name: ("I32", (groups, out_features * bits // 32)),
        scales.name: (scales.dtype if scales.dtype in ("F16", "BF16", "F32") else "F16", (groups, out_features)),
        g_idx.name: ("I32", (in_features,)),
    }
    if (out_features * bits) % 32:
        problems.append(f"{module}: {out_features} outputs cannot be packed at {bits} bits in qzeros")
    for entry in (qzeros, scales, g_idx):
        dtype, shape = expected[entry.name]
        if entry.dtype != dtype or entry.shape != shape:
            problems.append(f"{entry.name}: expected {dtype} {list(shape)} for bits={bits}, group_size={group_size} "
                            f"and qweight {list(qweight.shape)}, got {entry.dtype} {list(entry.shape)}")
    bias = tensors.get(f"{module}.bias")
    if bias is not None and bias[0].shape != (out_features,):
        problems.append(f"{module}.bias: expected shape [{out_features}], got {list(bias[0].shape)}")
    if g_idx.dtype == "I32" and g_idx.shape == (in_features,):
        _check_g_idx(g_idx, tensors[g_idx.name][1], groups, group_size, desc_act, problems)


def _check_g_idx(entry: TensorEntry, weight_file: WeightFile, groups: int, group_size: int, desc_act: bool,
                 problems: list[str]) -> None:
    import numpy as np

    values = np.frombuffer(_read_range(weight_file, entry.begin, entry.nbytes), dtype="<i4")
    if values.size and (values.min() < 0 or values.max() >= groups):
        problems.append(f"{entry.name}: values range over [{values.min()}, {values.max()}] but there are only "
                        f"{groups} groups")
        return
    if not desc_act and group_size > 0 and values.size:
        if not np.array_equal(values, np.arange(values.size) // group_size):
            problems.append(f"{entry.name}: desc_act is false but g_idx is not i // group_size")


def _read_range(weight_file: WeightFile, offset: int, length: int) -> bytes:
    with open_weight_file(weight_file) as stream:
        stream.seek(offset)
        return stream.read(length)


def _check_layers(config: dict[str, Any], modules: set[str], problems: list[str]) -> None:
    model_type = config.get("model_type")
    layer_count = next((config[k] for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
    if model_type is None or layer_count is None:
        return
    try:
        spec = get_arch(model_type)
    except GptqToolsError:
        logger.info("architecture %s is not in the table; layer coverage not checked", model_type)
        return
    missing = [f"{spec.layers_path}.{i}.{linear}" for i in range(layer_count) for linear in spec.quantized_linears
               if f"{spec.layers_path}.{i}.{linear}" not in modules]
    if missing:
        problems.append(f"config.json has {layer_count} {model_type} layers but {len(missing)} quantized linear(s) "
                        f"are missing, first {missing[0]}")
