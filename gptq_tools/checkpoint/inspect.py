"""``inspect``: what a file, a part set or a checkpoint folder holds, from headers and configs only."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import GptqToolsError
from ..files.parts import MultiPartReader, find_part_set, parse_part_name
from ..files.safetensors_format import SafetensorsHeader, open_regular_file, read_header, read_header_from


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
    other = sniff_non_safetensors(target)
    if other is not None:
        report["format"] = other
        report["problems"].append(f"{target}: not a safetensors file ({other}); inspect reads .safetensors files, "
                                  f"split parts and model folders")
        return report
    try:
        report["safetensors"] = describe_header(read_header(target), list_tensors)
    except GptqToolsError as exc:
        report["problems"].append(str(exc))
    return report


def sniff_non_safetensors(path: Path) -> str | None:
    """What ``path`` is when it clearly is not safetensors (``"JSON"``, ``"a zip archive (a PyTorch .bin/.pt)"``,
    ...), from its first bytes; None when it may be safetensors (the full check then names any problem)."""
    try:
        with open_regular_file(path) as handle:  # a FIFO or a device is refused without being read
            head = handle.read(4096)
    except (OSError, GptqToolsError):
        return None  # the safetensors reader reports why it cannot be read
    if head.startswith(b"version https://git-lfs"):
        return None  # the reader names Git LFS pointers itself
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return None
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "JSON" if path.suffix.lower() == ".json" or _is_json(path) else "text starting like JSON"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive: a PyTorch .bin/.pt checkpoint is one"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    if head.startswith(b"GGUF"):
        return "GGUF"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data without a safetensors header" if len(head) < 9 else None
    return "text"


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes()[:10_000_000])
    except ValueError:
        return False
    return True


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
        "parameters": sum(math.prod(e.shape) for e in header.tensors.values()),
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
    report["size"] = sum(f["size"] for f in report["files"])
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
    _describe_shards(folder, report, list_tensors)
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


INDEX_NAME = "model.safetensors.index.json"


def _describe_shards(folder: Path, report: dict[str, Any], list_tensors: bool) -> None:
    """Every whole ``*.safetensors`` of ``folder`` (parts aside): one summary (tensors, parameters, bytes per
    dtype), the files, and the index checked against them."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file() and parse_part_name(p.name) is None)
    if not files:
        return
    headers = {}
    for path in files:
        try:
            headers[path.name] = read_header(path)
        except GptqToolsError as exc:
            report["problems"].append(str(exc))
    merged = {f"{name}/{tensor}": entry for name, header in headers.items() for tensor, entry in header.tensors.items()}
    dtypes: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for entry in merged.values():
        dtypes[entry.dtype] += entry.nbytes
        counts[entry.dtype] += 1
    summary: dict[str, Any] = {
        "files": [{"name": n, "tensors": len(h.tensors), "data_bytes": h.data_bytes} for n, h in headers.items()],
        "tensors": len(merged), "parameters": sum(math.prod(e.shape) for e in merged.values()),
        "data_bytes": sum(h.data_bytes for h in headers.values()),
        "dtypes": {d: {"tensors": counts[d], "bytes": dtypes[d]} for d in sorted(dtypes)},
        "gptq_modules": sum(1 for n in merged if n.endswith(".qweight")),
    }
    if list_tensors:
        summary["tensor_list"] = [{"file": name, "name": e.name, "dtype": e.dtype, "shape": list(e.shape),
                                   "offset": e.begin, "bytes": e.nbytes}
                                  for name, header in headers.items()
                                  for e in sorted(header.tensors.values(), key=lambda e: e.begin)]
    report["safetensors"] = summary
    index = folder / INDEX_NAME
    if index.is_file():
        report["index"] = _check_index(index, headers, report["problems"])


def _check_index(index: Path, headers: dict[str, SafetensorsHeader], problems: list[str]) -> dict[str, Any]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = dict(data["weight_map"])
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(f"{index}: not a safetensors index ({exc}); it needs a weight_map of tensor -> file")
        return {"name": index.name}
    listed = sorted(set(weight_map.values()))
    missing = [name for name in listed if name not in headers]
    if missing:
        problems.append(f"{index}: names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                        f"in the folder; download the missing shard(s)")
    wrong = [t for t, f in weight_map.items() if f in headers and t not in headers[f].tensors]
    if wrong:
        problems.append(f"{index}: {len(wrong)} tensor(s) are not in the file the index names, e.g. {wrong[0]!r} "
                        f"in {weight_map[wrong[0]]}")
    total = (data.get("metadata") or {}).get("total_size") if isinstance(data.get("metadata"), dict) else None
    return {"name": index.name, "tensors": len(weight_map), "files": listed, "total_size": total}
