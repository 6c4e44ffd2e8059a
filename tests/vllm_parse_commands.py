"""Parse ``vllm serve`` command lines with vLLM's own parser (run with the vLLM venv's Python).

Reads a JSON list of shell lines on stdin; prints a JSON list of {"line", "ok", "error", "args"}.
"""

from __future__ import annotations

import json
import shlex
import sys

from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser


def main() -> int:
    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subcommand", required=True)
    ServeSubcommand().subparser_init(subparsers)
    results = []
    for line in json.load(sys.stdin):
        words = shlex.split(line)
        try:
            args = parser.parse_args(words[1:])
            validate_parsed_serve_args(args)
        except (SystemExit, ValueError, TypeError) as exc:
            results.append({"line": line, "ok": False, "error": repr(exc), "args": {}})
            continue
        keep = ("model_tag", "tensor_parallel_size", "pipeline_parallel_size", "max_model_len",
                "gpu_memory_utilization", "max_num_seqs", "distributed_executor_backend", "nnodes", "node_rank",
                "master_addr", "headless", "port")
        results.append({"line": line, "ok": True, "error": "",
                        "args": {key: getattr(args, key, None) for key in keep}})
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
