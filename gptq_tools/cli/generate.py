"""``gptq-tools generate``: load a GPTQ model across the devices and answer one prompt."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..errors import UsageError

if TYPE_CHECKING:
    import torch

EPILOG = """example (BLOOMZ, prompt format from its model card):
  gptq-tools generate ./bloomz-176B-GPTQ --max-memory 0=60GiB,1=79GiB \\
      --prompt "Translate to English: Je t'aime.
Translation:" --max-new-tokens 16
"""

_DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float32": "float32", "fp32": "float32"}


def parse_dtype(text: str) -> torch.dtype:
    """``"float16"`` / ``"bfloat16"`` / ``"float32"`` (and short forms) to a torch dtype."""
    import torch

    try:
        return getattr(torch, _DTYPES[text.lower()])
    except KeyError:
        raise UsageError(f"--dtype {text!r} is not supported; use float16, bfloat16 or float32") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    from .plan import add_placement_arguments

    parser = subparsers.add_parser(
        "generate", help="load a GPTQ model (across GPUs/CPU/disk) and generate text for a prompt",
        description="Load a GPTQ checkpoint with per-device memory caps and print the model's continuation "
                    "of --prompt.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", metavar="PATH", help="checkpoint folder (with config, tokenizer and weights)")
    parser.add_argument("--prompt", required=True, help="the text to continue, in the model's prompt format")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, help="random seed for --sample")
    parser.add_argument("--kernel", default="auto",
                        help="quantized-linear kernel (default: auto, the fastest per layer; -v shows the choice)")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA256 check of the weights")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickled weights (unsafe: unpickling can run code)")
    add_placement_arguments(parser)
    parser.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from ..generate import generate

    result = generate(args.path, args.prompt, max_new_tokens=args.max_new_tokens, max_memory=args.max_memory,
                      dtype=parse_dtype(args.dtype), offload_folder=args.offload_folder, do_sample=args.sample,
                      seed=args.seed, trust_remote_code=args.trust_remote_code, kernel=args.kernel,
                      batch_size=args.batch_size, seq_len=args.seq_len, cuda_context=args.cuda_context,
                      verify_hash=not args.no_verify,
                      allow_pickle=args.allow_pickle)
    print(result.prompt + result.text)
    print(f"[{result.new_tokens} tokens in {result.seconds:.1f} s, {result.tokens_per_second:.2f} tokens/s]",
          file=sys.stderr)
    return 0
