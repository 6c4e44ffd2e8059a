"""``gptq-tools eval``: perplexity of a model folder, and KL divergence from its fp16 model."""

from __future__ import annotations

import argparse
import json

from ..errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``eval`` sub-command."""
    parser = subparsers.add_parser(
        "eval", help="perplexity of a model folder (fp16 or GPTQ), and KL divergence from its fp16 model",
        description="Measure a model folder's perplexity on a text file (held-out text: the quality) or on the "
                    "calibration file (the fit to it), over non-overlapping windows; with --against, also the "
                    "fp16 model's perplexity and the mean KL divergence of the two next-token distributions, "
                    "which shows 4-bit noise that perplexity hides. Runs on the CPU in fp32 (GPTQ weights are "
                    "dequantized from the checkpoint's own tensors).")
    parser.add_argument("model", metavar="MODEL_DIR", help="the model folder to measure")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--text", metavar="FILE", help="held-out text (.txt, .jsonl) or token ids (.safetensors, .pt)")
    data.add_argument("--calibration", metavar="FILE", help="the calibration file quantize used")
    parser.add_argument("--against", metavar="FP16_DIR", help="the fp16 model folder to compare with (KL)")
    parser.add_argument("--seqlen", type=int, help="tokens per window (default: the model's maximum, at most 2048)")
    parser.add_argument("--max-tokens", type=int, help="use only the first N tokens of the file")
    parser.add_argument("--save", action="store_true",
                        help="also keep the result in MODEL_DIR/eval.json (written atomically; a new measurement of "
                             "the same file replaces the old one), which `gptq-tools publish` shows in the model card")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from ..files.paths import require_folder
    from ..quant.quality import evaluate_model, format_report

    if args.seqlen is not None and args.seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {args.seqlen}")
    require_folder(args.model, what="the model folder to measure")
    if args.against is not None:
        require_folder(args.against, what="the fp16 model folder to compare with")
    report = evaluate_model(args.model, args.text or args.calibration, against=args.against, seqlen=args.seqlen,
                            max_tokens=args.max_tokens)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    if args.save:
        from ..checkpoint.eval_results import save_eval_result

        saved = save_eval_result(args.model, report.to_dict())
        if not args.json:
            print(f"saved to {saved}")
    return 0
