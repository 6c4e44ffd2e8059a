"""``gptq-tools plan``: where a model's modules go on the given devices, and whether it fits."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..units import format_size, parse_size
from .common import add_placement_arguments, caps_from_args, options_from_args

if TYPE_CHECKING:  # the planner imports torch: only when a command runs, not to build the CLI
    from ..runtime.plan import Placement


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="plan the placement of a GPTQ model on GPUs/CPU/disk (reads only config and headers)",
        description="Plan where every module of a GPTQ checkpoint (folder) or preset goes under per-device "
                    "memory caps, with headroom for the CUDA context, activations, KV cache and output. "
                    "Exit status 0 when it fits, 1 when it does not.")
    add_placement_arguments(parser)
    parser.add_argument("source", metavar="PATH|PRESET[:BRANCH]|REPO[:BRANCH]",
                        help="checkpoint folder, preset (e.g. bloomz-176b-gptq:group_size_128g), or a repository "
                             "downloaded into its default folder")
    parser.add_argument("--branch", help="preset branch whose quantization settings apply (instead of :BRANCH)")
    parser.add_argument("--json", action="store_true", help="print the placement as JSON")
    vllm = parser.add_argument_group("serving with vLLM (--engine vllm)")
    vllm.add_argument("--engine", choices=("gptq-tools", "vllm"), default="gptq-tools",
                      help="vllm: choose tensor/pipeline parallel sizes for vllm serve and print its commands")
    vllm.add_argument("--nodes", type=int, default=1, help="nodes, each with --gpus (default 1)")
    vllm.add_argument("--max-model-len", type=int, help="vLLM --max-model-len (default: the model's maximum)")
    vllm.add_argument("--max-num-seqs", type=int, default=1, help="sequences whose KV cache must fit at once")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=0.92, help="vLLM's fraction (default 0.92)")
    vllm.add_argument("--model-ref", help="what vllm serve is given (default: the folder or the preset's repo id)")
    parser.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from ..runtime.plan import load_layout, place_layout

    if args.engine == "vllm":
        return _run_vllm_plan(args)
    caps = caps_from_args(args, required=True) or {}
    options = options_from_args(args)
    layout, _ = load_layout(args.source, options=options, branch=args.branch)
    placement = place_layout(layout, caps, options)
    if args.json:
        print(json.dumps(placement.to_json(), indent=2))
    else:
        print(format_placement(placement))
    return 0 if placement.fits else 1


def _run_vllm_plan(args: argparse.Namespace) -> int:
    from ..serving.plan import ServingOptions, format_serving_plan, plan_serving

    if not args.gpus or args.max_memory:
        raise UsageError("--engine vllm takes --gpus (8x80GB: the GPUs of one node), not --max-memory")
    if args.max_model_len is not None and args.max_model_len < 1 or args.max_num_seqs < 1:
        raise UsageError("--max-model-len and --max-num-seqs must be positive")
    options = ServingOptions(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                             gpu_memory_utilization=args.gpu_memory_utilization,
                             cuda_context_bytes=parse_size(args.cuda_context,
                                                           what="--cuda-context"))
    plan = plan_serving(args.source, gpus=args.gpus, nodes=args.nodes, options=options, branch=args.branch,
                        model_ref=args.model_ref)
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_serving_plan(plan))
    return 0 if plan.fits else 1


def format_placement(placement: Placement) -> str:
    """The placement as a table, one device a line, then the verdict."""
    lines = [(f"{placement.source}: {format_size(placement.total_weight_bytes)} of weights, headroom for batch "
              f"{placement.options.batch_size} x {placement.options.seq_len} tokens"),
             f"{'device':>6}  {'cap':>11}  {'weights':>11}  {'reserved':>11}  {'free':>11}  modules"]
    for key, device in placement.devices.items():
        cap = "unlimited" if device.cap_bytes is None else format_size(device.cap_bytes)
        free = "-" if device.free_bytes is None else format_size(device.free_bytes)
        lines.append(f"{key:>6}  {cap:>11}  {format_size(device.weight_bytes):>11}  "
                     f"{format_size(device.reserved_bytes):>11}  {free:>11}  {_summarise(device.modules)}")
        if device.reserved:
            detail = ", ".join(f"{name} {format_size(size)}" for name, size in device.reserved.items())
            lines.append(f"{'':>6}  reserved: {detail}")
    lines.append("fits" if placement.fits else f"{placement.reason}\n{placement.suggestion}")
    return "\n".join(lines)


def _summarise(modules: tuple[str, ...]) -> str:
    layers = [m for m in modules if m.rpartition(".")[2].isdigit()]
    others = [m for m in modules if m not in layers]
    parts = []
    if layers:
        first, last = layers[0].rpartition(".")[2], layers[-1].rpartition(".")[2]
        parts.append(f"{len(layers)} layers ({first}-{last})")
    parts.extend(others)
    return ", ".join(parts) or "-"
