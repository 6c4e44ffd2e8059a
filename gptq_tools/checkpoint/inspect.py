"""``inspect``: what a file, a part set or a checkpoint folder holds, from headers and configs only."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import GptqToolsError
from ..files.parts import MultiPartReader, find_part_set, parse_part_name
from ..files.safetensors_format import SafetensorsHeader, read_header, read_header_from


def inspect_path(path: str | os.PathLike[str], *, list_tensors: bool = False) -> dict[str, Any]:
    """A JSON-able description of ``path``: a safetensors file, one part of a set, or a folder.

    Problems found on the way (a missing part, a bad header, an inconsistent checkpoint) are reported
    under ``"problems"`` rather than raised, so that everything else is still shown.
    """
    target = Path(path)
    if target.is_dir():
        return _inspect_folder(target, list_tensors)
    if not target.exists():
        raise GptqToolsError(f"{target}: no such file or folder")
    if parse_part_name(target.name) is not None:
        return _inspect_part_set(target, list_tensors)
    report: dict[str, Any] = {"path": str(target), "kind": "file", "size": target.stat().st_size, "problems": []}
    try:
        report["safetensors"] = describe_header(read_header(target), list_tensors)
    except GptqToolsError as exc:
        report["problems"].append(str(exc))
    return report


def describe_header(header: SafetensorsHeader, list_tensors: bool) -> dict[str, Any]:
    """Summary of a header: tensor count, bytes per dtype, GPTQ modules, metadata (and every tensor if asked)."""
    dtypes: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for entry in header.tensors.values():
        dtypes[entry.dtype] += entry.nbytes
        counts[entry.dtype] += 1
    summary: dict[str, Any] = {
        "header_bytes": header.header_len,
        "tensors": len(header.tensors),
        "data_bytes": header.data_bytes,
        "dtypes": {d: {"tensors": counts[d], "bytes": dtypes[d]} for d in sorted(dtypes)},
        "gptq_modules": sum(1 for n in header.tensors if n.endswith(".qweight")),
        "metadata": header.metadata,
    }
    if list_tensors:
        summary["tensor_list"] = [{"name": e.name, "dtype": e.dtype, "shape": list(e.shape), "offset": e.begin,
                                   "bytes": e.nbytes} for e in sorted(header.tensors.values(), key=lambda e: e.begin)]
    return summary


def _inspect_part_set(part: Path, list_tensors: bool) -> dict[str, Any]:
    report: dict[str, Any] = {"path": str(part), "kind": "part set", "problems": []}
    try:
        part_set = find_part_set(part)
    except GptqToolsError as exc:
        report["problems"].append(str(exc))
        return report
    report.update(output_name=part_set.output_name, size=part_set.total_size,
                  parts=[{"name": p.name, "size": s} for p, s in zip(part_set.parts, part_set.sizes)])
    try:
        with MultiPartReader(part_set.parts) as reader:
            header = read_header_from(reader, reader.size, source=f"{part_set.output_name} (from parts)")
        report["safetensors"] = describe_header(header, list_tensors)
    except GptqToolsError as exc:
        report["problems"].append(str(exc))
    return report


def _inspect_folder(folder: Path, list_tensors: bool) -> dict[str, Any]:
    from .model_files import read_quantize_config
    from .validate import validate_checkpoint

    report: dict[str, Any] = {"path": str(folder), "kind": "folder", "problems": []}
    report["files"] = [{"name": p.name, "size": p.stat().st_size} for p in sorted(folder.iterdir()) if p.is_file()
                       and not p.name.startswith(".")]
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
            report["model_type"] = data.get("model_type")
            report["architectures"] = data.get("architectures")
        except ValueError as exc:
            report["problems"].append(f"{config}: not JSON ({exc})")
    if any(parse_part_name(f["name"]) for f in report["files"]):
        report["part_set"] = _inspect_part_set(folder, list_tensors)
        report["problems"].extend(report["part_set"].pop("problems"))
    try:
        read_quantize_config(folder)
    except GptqToolsError:
        return report  # not a GPTQ checkpoint: nothing more to check
    try:
        checkpoint = validate_checkpoint(folder, raise_on_error=False)
    except GptqToolsError as exc:
        report["problems"].append(str(exc))
        return report
    report["gptq"] = {key: checkpoint.quantize_config.get(key) for key in
                      ("bits", "group_size", "desc_act", "sym", "static_groups", "checkpoint_format", "damp_percent")}
    report["gptq"]["modules"] = len(checkpoint.modules)
    report["weights"] = [{"file": wf.label, "tensors": len(wf.header.tensors),
                          "from_parts": [p.name for p in wf.paths] if wf.is_parts else []} for wf in checkpoint.files]
    report["problems"].extend(checkpoint.problems)
    return report
