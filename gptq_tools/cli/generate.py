"""``gptq-tools generate``: load a GPTQ model across the devices and answer a prompt, or each line of stdin."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import UsageError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:

    from ..runtime.generate import GenerationResult, Sampling

EPILOG = """example (BLOOMZ, prompt format from its model card):
  gptq-tools generate ./bloomz-176B-GPTQ --max-memory 0=60GiB,1=79GiB \\
      --prompt "Translate to English: Je t'aime.
Translation:" --max-new-tokens 16
"""

def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from .common import add_placement_arguments

    parser = subparsers.add_parser(
        "generate", help="load a GPTQ model (across GPUs/CPU/disk) and generate text for a prompt",
        description="Load a GPTQ checkpoint with per-device memory caps and print the model's continuation "
                    "of --prompt as it is generated, or, with --interactive, of every line read from stdin.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", metavar="PATH|PRESET[:BRANCH]|REPO[:BRANCH]",
                        help="checkpoint folder (config, tokenizer, weights), or the name it was downloaded under "
                             "(the folder `gptq-tools download NAME` wrote)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the text to continue, in the model's prompt format")
    prompts.add_argument("--interactive", action="store_true",
                         help="load once, then answer each line read from stdin (one prompt a line), streaming")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per answer (prompt, text, new_tokens, seconds, tokens_per_second) "
                             "instead of streaming the text; with --interactive, one line per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    parser.add_argument("--sample", action="store_true",
                        help="sample instead of greedy decoding (implied by --temperature, --top-p or --top-k)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default 0.7; 0 = greedy)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling: keep the top tokens holding this much "
                        "probability (default 0.9; 1 = off)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default 50, as in "
                        "transformers; 0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="above 1 discourages repeating tokens, greedy or sampled (default 1 = off)")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--kernel", default="auto",
                        help="quantized-linear kernel (default: auto, the fastest per layer; -v shows the choice)")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA256 check of the weights")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickled weights (unsafe: unpickling can run code)")
    add_placement_arguments(parser)
    parser.set_defaults(func=run_generate)


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    """The :class:`~gptq_tools.runtime.generate.Sampling` the options ask for (checked)."""
    from ..runtime.generate import Sampling

    knobs = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    given = {name: value for name, value in knobs.items() if value is not None}
    sampling = Sampling(do_sample=args.sample or bool(given), repetition_penalty=args.repetition_penalty,
                        seed=args.seed, **given)
    sampling.check()
    return sampling


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _report(result: GenerationResult) -> None:
    print(f"[{result.new_tokens} tokens in {result.seconds:.1f} s, {result.tokens_per_second:.2f} tokens/s]",
          file=sys.stderr)
    logger.info("new token ids: %s", " ".join(str(token) for token in result.token_ids))


def run_generate(args: argparse.Namespace) -> int:
    from ..runtime.generate import generate_each, generate_text, load_for_generation
    from .common import caps_from_args, parse_dtype

    sampling = sampling_from_args(args)
    if not args.interactive and not args.prompt:
        raise UsageError("the prompt is empty; pass the text to continue, e.g. --prompt \"Translate to English: "
                         "...\", or --interactive to read prompts from stdin")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = load_for_generation(
        args.path, max_memory=caps_from_args(args, required=False), dtype=parse_dtype(args.dtype),
        offload_folder=args.offload_folder, kernel=args.kernel,
        batch_size=args.batch_size, seq_len=args.seq_len, cuda_context=args.cuda_context,
        verify_hash=not args.no_verify, allow_pickle=args.allow_pickle)
    if not args.interactive:
        if not args.json:
            _write(args.prompt)
        result = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
                               on_text=None if args.json else _write)
        _write(_json_line(result) if args.json else "\n")
        _report(result)
        return 0
    echo = not args.json and not sys.stdin.isatty()  # piped prompts: say which answer belongs to which
    for result in generate_each(model, tokenizer, _stdin_prompts(echo=echo), max_new_tokens=args.max_new_tokens,
                                sampling=sampling, on_text=None if args.json else _write):
        _write(_json_line(result) if args.json else f"\n{ANSWER_END}\n")
        _report(result)
    return 0


#: The line that ends each answer of ``generate --interactive`` in text mode (answers may hold newlines).
ANSWER_END = "--- end of answer ---"


def _json_line(result: GenerationResult) -> str:
    import json

    return json.dumps({"prompt": result.prompt, "text": result.text, "new_tokens": result.new_tokens,
                       "token_ids": list(result.token_ids), "seconds": round(result.seconds, 3),
                       "tokens_per_second": round(result.tokens_per_second, 3)}, ensure_ascii=False) + "\n"


#: The longest prompt line ``--interactive`` reads (far beyond any model's context).
MAX_PROMPT_CHARS = 1 << 20


def _stdin_prompts(*, echo: bool = False) -> Iterator[str]:
    """Lines of stdin, with a ``> `` cue on stderr when a person is typing; ``echo`` writes each prompt that
    will be answered on stdout as ``> PROMPT`` first."""
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline(MAX_PROMPT_CHARS + 1)  # bounded: `< /dev/zero` is one endless line
        if not line:
            return
        if len(line) > MAX_PROMPT_CHARS:
            raise UsageError(f"stdin: a prompt line is longer than {MAX_PROMPT_CHARS} characters (is stdin a "
                             f"binary file?); give one prompt per line")
        if echo and line.strip():
            _write(f"> {line.rstrip(chr(13) + chr(10))}\n")
        yield line
