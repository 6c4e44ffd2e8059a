"""``join``, ``split``, ``reshard`` and ``inspect``: argument parsing and printing only.

``verify`` lives in :mod:`gptq_tools.cli.verify`; the reports both print are in :mod:`gptq_tools.cli.common`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..units import format_size


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _register_join(subparsers)
    _register_split(subparsers)
    _register_inspect(subparsers)


def _register_join(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "join", help="join split parts into one file, verifying its SHA256 in the same pass",
        description="Join byte-split parts (NAME.JOINBEFOREUSE.split-a.safetensors ..., NAME.001 ...) into one "
                    "file. Give the parts in order, or a folder / one part to find and order the set. The "
                    "output takes its final name only after its SHA256 matched.")
    parser.add_argument("parts", nargs="+", type=Path, help="the parts in order, or a folder, or one part")
    parser.add_argument("-o", "--output", type=Path, help="output file or folder (default: beside the parts)")
    parser.add_argument("--sha256", help="expected SHA256 of the joined file")
    parser.add_argument("--manifest", type=Path, help="sha256sum-format manifest naming the joined file and/or parts "
                        "(default: SHA256SUMS beside the parts, if present)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--delete-parts", action="store_true", help="delete the parts after a verified join")
    parser.add_argument("--method", default="auto", choices=["auto", "reflink", "copy_file_range", "readwrite"],
                        help="how bytes are moved (default: reflink where possible, else copy_file_range)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_join)


def _join(args: argparse.Namespace) -> int:
    from ..files.join import join_parts

    started = time.monotonic()
    parts: Any = args.parts[0] if len(args.parts) == 1 else args.parts
    result = join_parts(parts, args.output, expected_sha256=args.sha256, manifest=args.manifest, force=args.force,
                        delete_parts=args.delete_parts, method=args.method)
    seconds = time.monotonic() - started
    if args.json:
        print(json.dumps({"output": str(result.output), "sha256": result.sha256, "verified": result.verified,
                          "expected_source": result.expected_source, "bytes": result.total_bytes,
                          "parts": result.part_sha256, "method": result.method, "seconds": round(seconds, 3),
                          "deleted_parts": [str(p) for p in result.deleted_parts],
                          "already_done": result.already_done}, indent=2))
        return 0
    if result.already_done:
        print(f"already joined and verified: {result.output} (SHA256 {result.sha256} matches "
              f"{result.expected_source})")
        for part in result.deleted_parts:
            print(f"deleted {part}")
        return 0
    rate = f"{result.total_bytes / seconds / 1e9:.2f} GB/s, " if seconds > 0 and result.total_bytes > 1 << 26 else ""
    print(f"joined {len(result.part_sha256)} parts -> {result.output} ({format_size(result.total_bytes)}) "
          f"in {seconds:.1f} s ({rate}{result.method})")
    print(f"{result.sha256}  {result.output.name}")
    if result.verified:
        print(f"verified: SHA256 matches {result.expected_source}")
    else:
        print("NOT verified: no expected hash (pass --sha256 HEX or --manifest SHA256SUMS)")
    for part in result.deleted_parts:
        print(f"deleted {part}")
    return 0


def _register_split(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "split", help="split a file into byte parts plus a SHA256SUMS manifest (for publishing)",
        description="Split FILE into NAME.JOINBEFOREUSE.split-a.EXT, -b ... of at most --max-size bytes, "
                    "and write SHA256SUMS with the whole file's hash and every part's.")
    parser.add_argument("file", type=Path)
    parser.add_argument("--max-size", required=True, help="largest part, e.g. 45GiB (GiB = 2^30, GB = 10^9)")
    parser.add_argument("-o", "--output-dir", type=Path, help="folder for the parts (default: beside FILE)")
    parser.add_argument("--force", action="store_true", help="overwrite existing parts")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_split)
    parser = subparsers.add_parser(
        "reshard", help="rewrite one safetensors file as valid shards with model.safetensors.index.json",
        description="Rewrite FILE as model-0000i-of-0000N.safetensors shards (each a valid safetensors file) and "
                    "model.safetensors.index.json, verified against the source, plus SHA256SUMS.")
    parser.add_argument("file", type=Path)
    parser.add_argument("-o", "--output-dir", type=Path, help="folder for the shards (default: beside FILE)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard (default 5GB)")
    parser.add_argument("--force", action="store_true", help="overwrite existing shards and index")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_reshard)


def _split(args: argparse.Namespace) -> int:
    from ..files.split import split_file

    result = split_file(args.file, max_size=args.max_size, output_dir=args.output_dir, force=args.force)
    if args.json:
        print(json.dumps({"parts": [str(p) for p in result.parts], "sha256": result.sha256,
                          "part_sha256": result.part_sha256, "manifest": str(result.manifest),
                          "already_done": result.already_done}, indent=2))
        return 0
    if result.already_done:
        print(f"already split and verified: {len(result.parts)} parts of {args.file.name} "
              f"(SHA256 {result.sha256}) listed in {result.manifest}")
        return 0
    for part in result.parts:
        print(f"{result.part_sha256[part.name]}  {part.name}  ({format_size(part.stat().st_size)})")
    print(f"{result.sha256}  {args.file.name}  (whole file)")
    print(f"wrote {result.manifest}")
    return 0


def _reshard(args: argparse.Namespace) -> int:
    from ..files.split import reshard_file

    result = reshard_file(args.file, args.output_dir or args.file.parent, max_shard_size=args.max_shard_size,
                          force=args.force)
    if args.json:
        print(json.dumps({"shards": [str(p) for p in result.shards], "index": str(result.index),
                          "manifest": str(result.manifest), "total_size": result.total_size,
                          "already_done": result.already_done}, indent=2))
        return 0
    if result.already_done:
        print(f"already resharded and verified: {len(result.shards)} shard(s) of {args.file.name} with "
              f"{result.index.name} in {result.index.parent}")
        return 0
    for shard in result.shards:
        print(f"{shard.name}  ({format_size(shard.stat().st_size)})")
    print(f"wrote {result.index.name} and {result.manifest.name}; every shard verified against {args.file.name}")
    return 0


def _register_inspect(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "inspect", help="show what a file, part set or checkpoint folder holds (headers only)",
        description="Tensors, dtypes, bytes, metadata, GPTQ settings, detected part sets and what is missing.")
    parser.add_argument("path", metavar="PATH|PRESET[:BRANCH]|REPO[:BRANCH]",
                        help="a file, part or folder, or the name a model was downloaded under")
    parser.add_argument("--tensors", action="store_true", help="list every tensor")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from ..checkpoint.inspect import inspect_path
    from ..checkpoint.presets import resolve_model
    from ..files.paths import looks_like_path

    path = Path(args.path)
    if not path.exists() and not looks_like_path(args.path):  # a model name: its download folder
        path = resolve_model(args.path, need_folder=True).folder or path
    report = inspect_path(path, list_tensors=args.tensors)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 1 if report["problems"] else 0


def _print_safetensors(info: dict[str, Any], indent: str) -> None:
    dtypes = ", ".join(f"{d} {v['tensors']} ({format_size(v['bytes'])})" for d, v in info["dtypes"].items())
    files = f"{len(info['files'])} file(s), " if "files" in info else ""
    gptq = f", {info['gptq_modules']} GPTQ modules" if info["gptq_modules"] else ""
    print(f"{indent}  safetensors: {files}{info['tensors']} tensors, {_count(info['parameters'])} parameters, "
          f"{format_size(info['data_bytes'])} of data{gptq}")
    print(f"{indent}  dtypes: {dtypes or 'none'}")
    for shard in info.get("files", []):
        print(f"{indent}  file {shard['name']}  {shard['tensors']} tensors  {format_size(shard['data_bytes'])}")
    if info.get("metadata"):
        print(f"{indent}  metadata: {json.dumps(info['metadata'])}")
    for tensor in info.get("tensor_list", []):
        where = f"{tensor['file']}: " if "file" in tensor else ""
        print(f"{indent}    {where}{tensor['name']}  {tensor['dtype']} {tensor['shape']}  @{tensor['offset']}")


def _count(number: int) -> str:
    """``1234567`` as ``1.23M`` (``k``, ``M``, ``B``, ``T``), exact under 1000."""
    for scale, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k")):
        if number >= scale:
            return f"{number / scale:.2f}{suffix} ({number})"
    return str(number)


def _print_report(report: dict[str, Any], indent: str = "") -> None:
    size = f", {format_size(report['size'])}" if "size" in report else ""
    print(f"{indent}{report['path']}: {report['kind']}{size}")
    for key in ("model_type", "output_name", "format"):
        if report.get(key):
            print(f"{indent}  {key.replace('_', ' ')}: {report[key]}")
    if report.get("architectures"):
        print(f"{indent}  architectures: {', '.join(map(str, report['architectures']))}")
    for part in report.get("parts", []):
        print(f"{indent}  part {part['name']}  {format_size(part['size'])}")
    if "gptq" in report:
        settings = ", ".join(f"{k}={v}" for k, v in report["gptq"].items() if v is not None)
        print(f"{indent}  gptq: {settings}")
    for weight in report.get("weights", []):
        source = f" (read from {len(weight['from_parts'])} parts)" if weight["from_parts"] else ""
        print(f"{indent}  weights: {weight['file']}, {weight['tensors']} tensors{source}")
    if "safetensors" in report:
        _print_safetensors(report["safetensors"], indent)
    if "index" in report:
        index = report["index"]
        if "tensors" in index:
            total = f", total_size {index['total_size']}" if index.get("total_size") is not None else ""
            print(f"{indent}  index: {index['name']}, {index['tensors']} tensors in {len(index['files'])} "
                  f"file(s){total}")
    if "part_set" in report:
        _print_report(report["part_set"], indent + "  ")
    for problem in report.get("problems", []):
        print(f"{indent}  PROBLEM: {problem}")
