"""``join``, ``verify``, ``split``, ``reshard`` and ``inspect``: argument parsing and printing only.

``verify`` lives in :mod:`gptq_tools.cli.verify`; its ``--structure`` and ``--parts`` print through
:func:`_report` here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..units import format_size


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _register_join(subparsers)
    _register_verify(subparsers)
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
    from ..join import join_parts

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


def _register_verify(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from .verify import register as register_verify

    register_verify(subparsers)


def _structure_check(path: Path) -> Any:
    from ..checkpoint import validate_checkpoint
    from ..errors import GptqToolsError
    from ..parts import parse_part_name
    from ..verify import FileCheck

    try:
        if path.is_dir():
            report = validate_checkpoint(path)
            detail = f"GPTQ checkpoint, {len(report.modules)} quantized modules, bits={report.quantize_config['bits']}"
        elif parse_part_name(path.name) is not None:
            from ..parts import check_safetensors_parts, find_part_set

            part_set = find_part_set(path)
            check_safetensors_parts(part_set)
            detail = f"safetensors from {len(part_set.parts)} parts"
        else:
            from ..safetensors_format import read_header

            header = read_header(path)
            detail = f"safetensors, {len(header.tensors)} tensors"
    except (GptqToolsError, OSError) as exc:
        message = str(exc)
        prefix = f"{path}: "
        return FileCheck(str(path), str(path), None, None, "FAILED",
                         message[len(prefix):] if message.startswith(prefix) else message)
    return FileCheck(str(path), str(path), None, None, "OK", detail)


def _structure_report(results: list[Any], *, as_json: bool) -> int:
    """Print ``verify --structure`` results: a structure check computes no checksum, so none is blamed."""
    if as_json:
        return _report(results, as_json=True, check_type=type(results[0]))
    failed = 0
    for result in results:
        if result.status == "OK":
            print(f"{result.name}: OK ({result.detail})")
        else:
            failed += 1
            print(f"{result.name}: FAILED")
            print(f"gptq-tools: {result.name}: {result.detail}", file=sys.stderr)
    if failed:
        print(f"gptq-tools: WARNING: {failed} of {len(results)} failed the structure check", file=sys.stderr)
    return 1 if failed else 0


def _report(results: list[Any], *, as_json: bool, check_type: type) -> int:
    failed = [r for r in results if r.status in ("FAILED", "MISSING")]
    if as_json:
        print(json.dumps({"ok": not failed, "failed": len(failed), "results": [r.to_dict() for r in results]},
                         indent=2))
        return 1 if failed else 0
    for result in results:
        if result.status == "UNVERIFIED":
            print(f"{result.actual}  {result.name}")
            print(f"gptq-tools: {result.name}: NOT verified: no expected hash (pass --sha256 or -c SHA256SUMS)",
                  file=sys.stderr)
        elif result.status == "MISSING":
            print(f"{result.name}: FAILED open or read")
            print(f"gptq-tools: {result.name}: {result.detail}", file=sys.stderr)
        elif result.detail and result.status == "FAILED":
            print(f"{result.name}: FAILED")
            print(f"gptq-tools: {result.name}: {result.detail}", file=sys.stderr)
        else:
            print(f"{result.name}: {result.status}" + (f" ({result.detail})" if result.detail else ""))
    mismatched = sum(1 for r in failed if r.status == "FAILED")
    unreadable = len(failed) - mismatched
    if mismatched:
        noun = "checksum" if mismatched == 1 else "checksums"
        print(f"gptq-tools: WARNING: {mismatched} computed {noun} did NOT match", file=sys.stderr)
    if unreadable:
        print(f"gptq-tools: WARNING: {unreadable} listed file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


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
    from ..split import split_file

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
    from ..split import reshard_file

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
    from ..inspect_path import inspect_path
    from ..paths import looks_like_path
    from ..presets import resolve_model

    path = Path(args.path)
    if not path.exists() and not looks_like_path(args.path):  # a model name: its download folder
        path = resolve_model(args.path, need_folder=True).folder or path
    report = inspect_path(path, list_tensors=args.tensors)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 1 if report["problems"] else 0


def _print_report(report: dict[str, Any], indent: str = "") -> None:
    size = f", {format_size(report['size'])}" if "size" in report else ""
    print(f"{indent}{report['path']}: {report['kind']}{size}")
    for key in ("model_type", "output_name"):
        if report.get(key):
            print(f"{indent}  {key.replace('_', ' ')}: {report[key]}")
    for part in report.get("parts", []):
        print(f"{indent}  part {part['name']}  {format_size(part['size'])}")
    if "gptq" in report:
        settings = ", ".join(f"{k}={v}" for k, v in report["gptq"].items() if v is not None)
        print(f"{indent}  gptq: {settings}")
    for weight in report.get("weights", []):
        source = f" (read from {len(weight['from_parts'])} parts)" if weight["from_parts"] else ""
        print(f"{indent}  weights: {weight['file']}, {weight['tensors']} tensors{source}")
    if "safetensors" in report:
        info = report["safetensors"]
        dtypes = ", ".join(f"{d} {v['tensors']} ({format_size(v['bytes'])})" for d, v in info["dtypes"].items())
        print(f"{indent}  safetensors: {info['tensors']} tensors, {format_size(info['data_bytes'])} of data, "
              f"{info['gptq_modules']} GPTQ modules")
        print(f"{indent}  dtypes: {dtypes or 'none'}")
        if info["metadata"]:
            print(f"{indent}  metadata: {json.dumps(info['metadata'])}")
        for tensor in info.get("tensor_list", []):
            print(f"{indent}    {tensor['name']}  {tensor['dtype']} {tensor['shape']}  @{tensor['offset']}")
    if "part_set" in report:
        _print_report(report["part_set"], indent + "  ")
    for problem in report.get("problems", []):
        print(f"{indent}  PROBLEM: {problem}")
