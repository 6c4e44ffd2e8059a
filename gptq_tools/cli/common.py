"""Helpers several commands share (so no command module imports another): placement options for ``plan`` and
``generate``, and the check reports of ``verify``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..units import parse_size

if TYPE_CHECKING:  # the planner imports torch: only when a command runs, not to build the CLI
    import torch

    from ..runtime.plan import PlanOptions


logger = logging.getLogger(__name__)

_DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float32": "float32", "fp32": "float32"}


def parse_dtype(text: str) -> torch.dtype:
    """``"float16"`` / ``"bfloat16"`` / ``"float32"`` (and short forms) to a torch dtype."""
    import torch

    try:
        return getattr(torch, _DTYPES[text.lower()])
    except KeyError:
        raise UsageError(f"--dtype {text!r} is not supported; use float16, bfloat16 or float32") from None


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``plan`` and ``generate``."""
    parser.add_argument("--max-memory", help="caps per device: 0=60GiB,1=79GiB,cpu=64GiB (sizes as accelerate reads "
                        "them: GiB = 2^30, GB = 10^9, a lowercase b means bits, a bare number is bytes)")
    parser.add_argument("--gpus", help="GPU sizes instead of --max-memory: 2x80GB, 3x48GiB or 80GiB,48GiB")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size to reserve headroom for (default 1)")
    parser.add_argument("--seq-len", type=int, default=2048,
                        help="prompt + new tokens to reserve headroom for (default 2048)")
    parser.add_argument("--dtype", default="float16", help="float16 (default), bfloat16 or float32")
    parser.add_argument("--cuda-context", default="1GiB", help="memory the CUDA context takes per GPU (default 1GiB)")
    parser.add_argument("--offload-folder", help="allow modules that fit nowhere else on disk, in this folder")


def options_from_args(args: argparse.Namespace) -> PlanOptions:
    from ..runtime.plan import PlanOptions

    if args.batch_size < 1 or args.seq_len < 1:
        raise UsageError("--batch-size and --seq-len must be positive")
    return PlanOptions(dtype=parse_dtype(args.dtype), batch_size=args.batch_size, seq_len=args.seq_len,
                       cuda_context_bytes=parse_size(args.cuda_context, what="--cuda-context"),
                       allow_disk=args.offload_folder is not None)


def caps_from_args(args: argparse.Namespace, *, required: bool) -> dict[int | str, int] | None:
    """The per-device caps of ``--max-memory`` or ``--gpus`` (None when neither is given and not ``required``)."""
    from ..runtime.plan import parse_gpus, parse_max_memory

    if (args.max_memory and args.gpus) or (required and not args.max_memory and not args.gpus):
        raise UsageError("give exactly one of --max-memory (0=60GiB,1=79GiB) or --gpus (2x80GB)")
    if not args.max_memory and not args.gpus:
        return None
    caps = parse_max_memory(args.max_memory) if args.max_memory else parse_gpus(args.gpus)
    warn_tiny_caps(caps, option="--max-memory" if args.max_memory else "--gpus")
    return caps


def warn_tiny_caps(caps: dict[int | str, int], *, option: str) -> None:
    """A cap under 1 MiB is almost always a unit left out (``2x80`` is two GPUs of 80 *bytes*): say so."""
    tiny = {key: size for key, size in caps.items() if size < 2**20}
    if tiny:
        shown = ", ".join(f"{key}={size} B" for key, size in tiny.items())
        logger.warning("%s: cap(s) below 1 MiB (%s): a bare number is bytes; write the unit, e.g. 80GB or "
                       "80GiB", option, shown)


def structure_check(path: Path) -> Any:
    from ..checkpoint.validate import validate_checkpoint
    from ..errors import GptqToolsError
    from ..files.parts import parse_part_name
    from ..files.verify import FileCheck

    try:
        if path.is_dir():
            report = validate_checkpoint(path)
            detail = f"GPTQ checkpoint, {len(report.modules)} quantized modules, bits={report.quantize_config['bits']}"
        elif parse_part_name(path.name) is not None:
            from ..files.parts import check_safetensors_parts, find_part_set

            part_set = find_part_set(path)
            check_safetensors_parts(part_set)
            detail = f"safetensors from {len(part_set.parts)} parts"
        else:
            from ..files.safetensors_format import read_header

            header = read_header(path)
            detail = f"safetensors, {len(header.tensors)} tensors"
    except (GptqToolsError, OSError) as exc:
        message = str(exc)
        prefix = f"{path}: "
        return FileCheck(str(path), str(path), None, None, "FAILED",
                         message[len(prefix):] if message.startswith(prefix) else message)
    return FileCheck(str(path), str(path), None, None, "OK", detail)


def structure_report(results: list[Any], *, as_json: bool) -> int:
    """Print ``verify --structure`` results: a structure check computes no checksum, so none is blamed."""
    if as_json:
        return report_checks(results, as_json=True, check_type=type(results[0]))
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


#: Statuses that fail a check, in every mode of ``verify`` (exit status 1, ``"ok": false``): a check that found no
#: expected hash (UNVERIFIED) proves nothing, so it is not OK.
NOT_OK = ("FAILED", "MISSING", "UNVERIFIED")


def report_checks(results: list[Any], *, as_json: bool, check_type: type) -> int:
    failed = [r for r in results if r.status in NOT_OK]
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
    unverified = sum(1 for r in failed if r.status == "UNVERIFIED")
    unreadable = len(failed) - mismatched - unverified
    if unverified:
        print(f"gptq-tools: WARNING: {unverified} file(s) could not be verified (no expected hash)", file=sys.stderr)
    if mismatched:
        noun = "checksum" if mismatched == 1 else "checksums"
        print(f"gptq-tools: WARNING: {mismatched} computed {noun} did NOT match", file=sys.stderr)
    if unreadable:
        print(f"gptq-tools: WARNING: {unreadable} listed file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def add_wait_lock_argument(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--wait-lock [SECONDS]``: wait for another run holding the working folder's lock instead of refusing."""
    parser.add_argument("--wait-lock", nargs="?", type=_wait_seconds, const=math.inf, default=0.0, metavar="SECONDS",
                        help=f"if another {what} is running, wait for it to finish (at most SECONDS; without a "
                             f"number, as long as it takes) instead of stopping at once")


def _wait_seconds(text: str) -> float:
    """A ``--wait-lock`` value: seconds, 0 or more (``inf`` is accepted)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds; write the option after the "
                                         f"positional arguments, or as --wait-lock=SECONDS") from None
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 seconds or more")
    return value
