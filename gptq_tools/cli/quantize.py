"""``gptq-tools quantize``: GPTQ-quantize a Hugging Face model folder into an AutoGPTQ checkpoint."""

from __future__ import annotations

import argparse
import logging
import math
from typing import TYPE_CHECKING

from .common import add_wait_lock_argument

if TYPE_CHECKING:  # the quantizer pulls in torch: import it only when the command runs
    from ..quant.config import QuantizeConfig
    from ..quant.driver import QuantizeSummary

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize", help="GPTQ-quantize a model layer by layer into an AutoGPTQ checkpoint",
        description="Quantize MODEL_DIR (config.json + safetensors + tokenizer) with GPTQ, streaming one layer "
                    "at a time, and write an AutoGPTQ-format checkpoint to OUT. Interrupted runs continue "
                    "with --resume.")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="source model folder")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (must be empty or new)")
    parser.add_argument("--calibration", required=True, metavar="FILE",
                        help="calibration data: .txt, .jsonl (\"text\" field), or tokenized .safetensors/.pt")
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    parser.add_argument("--group-size", type=int, default=128, help="inputs per group; -1 for none (default 128)")
    parser.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=True,
                        help="act-order: quantize columns by decreasing Hessian diagonal (default on)")
    parser.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=True,
                        help="with --desc-act: group parameters fixed before act-order, so g_idx stays monotonic "
                             "and vLLM loads the checkpoint (default on; --no-static-groups for dynamic groups)")
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric")
    parser.add_argument("--damp", type=float, default=0.01,
                        help="dampening, relative to mean(diag(H)), in (0, 1) (default 0.01)")
    parser.add_argument("--format", dest="checkpoint_format", default="gptq", choices=("gptq", "gptq_v2"),
                        help="checkpoint format (default gptq = v1, read by everything)")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    parser.add_argument("--seqlen", type=int, default=None,
                        help="tokens per window (default 2048, capped by the model)")
    parser.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard (default 5GB)")
    parser.add_argument("--single-file", action="store_true",
                        help="one model.safetensors file instead of shards")
    parser.add_argument("--autogptq-name", action="store_true",
                        help="one file named as AutoGPTQ does, gptq_model-{bits}bit-{gs}g.safetensors (implies "
                             "--single-file; transformers does not find that name)")
    parser.add_argument("--method", choices=("gptq", "fp-target", "rtn"), default=None,
                        help="how the integer weights are chosen (same checkpoint format): fp-target (the "
                             "default) = GPTQ solved against the full-precision model's outputs, correcting the "
                             "error earlier layers pass on; gptq = plain GPTQ (--method gptq); rtn = "
                             "round-to-nearest baseline (measurements in docs/quantization-methods.md)")
    parser.add_argument("--target-alpha", type=float, default=None,
                        help="fp-target: share of the inherited error to correct, in (0, 1] (default 1)")
    parser.add_argument("--scale-search", choices=("minmax", "mse"), default=None,
                        help="group scales: minmax range (default), or an MSE search over clipping ranges")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    add_wait_lock_argument(parser, what="quantization into the same OUT")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..quant.driver import quantize_model

    config = _config(args)
    summary = quantize_model(args.model_dir, args.output, calibration=args.calibration, config=config,
                             nsamples=args.nsamples, seqlen=args.seqlen, device=args.device, resume=args.resume,
                             max_shard_size=args.max_shard_size, single_file=args.single_file,
                             autogptq_name=args.autogptq_name, seed=args.seed, wait_lock=args.wait_lock)
    if summary.rank == 0:  # distributed runs (torchrun): rank 0 wrote the output and reports for all
        print(format_summary(summary))
    return 0


def _config(args: argparse.Namespace) -> QuantizeConfig:
    """The settings, checked before anything is read or written.

    Values no client loads (``--damp 0``, a group size of 0) are refused by :class:`QuantizeConfig`;
    settings that some client refuses are warned about, each with the client and what to use instead.

    Raises:
        UsageError: a value no client accepts.
    """
    from ..errors import UsageError
    from ..quant.config import QuantizeConfig

    if args.nsamples < 1:
        raise UsageError(f"--nsamples {args.nsamples} must be positive (default 128)")
    if args.seqlen is not None and args.seqlen < 1:
        raise UsageError(f"--seqlen {args.seqlen} must be positive (default 2048, capped by the model)")
    if args.static_groups and not args.desc_act:
        logger.info("--static-groups has no effect without --desc-act")
    chosen = {key: value for key, value in (("method", args.method), ("target_alpha", args.target_alpha),
                                            ("scale_search", args.scale_search)) if value is not None}
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act,
                            static_groups=args.static_groups, sym=args.sym, damp_percent=args.damp,
                            checkpoint_format=args.checkpoint_format, **chosen)
    for line in config.client_warnings():
        logger.warning("gptq-tools: warning: %s", line)
    return config


def format_summary(summary: QuantizeSummary) -> str:
    """The end-of-run table: one row per layer (summed error, GPTQ vs RTN, time), then where the time went.

    ``solve_s`` is the GPTQ math of the layer's linears; ``layer_s`` the layer's whole wall time (load,
    Hessians, solve, forward pass to the next layer, save). Setup, the layers and writing add up to the total.
    """
    if summary.already_done:
        return (f"already quantized: {summary.output} is complete (every file matches its SHA256SUMS); nothing "
                f"to resume. Delete it to quantize again")
    rows = ["quantization summary; err: mean squared output error per calibration token, rtn_err: the same for "
            "round-to-nearest",
            "layer  linears  err         rtn_err     gain      damp    solve_s  layer_s"]
    layers = sorted({report.layer for report in summary.linears})
    for layer in layers:
        reports = [r for r in summary.linears if r.layer == layer]
        error = sum(r.error for r in reports)
        rtn_error = sum(r.rtn_error for r in reports)
        gain = rtn_error / error if error > 0 else math.inf
        wall = summary.layer_seconds.get(layer)
        rows.append(f"{layer:5d}  {len(reports):7d}  {error:10.4g}  {rtn_error:10.4g}  {gain:7.2f}x  "
                    f"{max(r.damp_percent for r in reports):6.3f}  {sum(r.seconds for r in reports):7.2f}  "
                    + (f"{wall:7.2f}" if wall is not None else "      -"))
    rows.append(f"quantized {len(summary.linears)} linears in {len(layers)} layers in {summary.seconds:.1f} s"
                + (f" (resumed at layer {summary.resumed_from_layer}; '-': done by the earlier run)"
                   if summary.resumed_from_layer else ""))
    rows.append(f"time: setup {summary.setup_seconds:.1f} s + {len(summary.layer_seconds)} layers "
                f"{sum(summary.layer_seconds.values()):.1f} s + writing {summary.write_seconds:.1f} s "
                f"= {summary.seconds:.1f} s")
    if summary.world_size > 1:
        rows.append(f"distributed over {summary.world_size} ranks: {summary.comm_seconds:.1f} s of rank 0's "
                    f"{summary.seconds:.1f} s in collectives")
    if summary.raised_damping:
        raised = summary.raised_damping
        rows.append(f"raised dampening (Cholesky failed at damp {summary.config.damp_percent:g}): {len(raised)} "
                    f"linear{'s' if len(raised) != 1 else ''}: {', '.join(raised)}")
    if summary.fallbacks:
        rows.append(f"round-to-nearest fallback (Cholesky failed): {', '.join(summary.fallbacks)}")
    rows.append(f"wrote {summary.output}: {', '.join(summary.files)}")
    return "\n".join(rows)
