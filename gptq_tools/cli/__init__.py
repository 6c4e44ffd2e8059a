"""The ``gptq-tools`` command line (imports every stage below it): parses arguments and calls the library,
nothing more.

Each command module registers its sub-commands with ``register(subparsers)`` and sets ``func`` to a
function taking the parsed arguments and returning the exit status. Known errors become one line on
stderr and a non-zero exit; unknown errors keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from .. import constants
from ..constants import __version__
from ..errors import GptqToolsError, UsageError
from ..progress import set_progress

#: Modules that register sub-commands, in the order their commands appear in ``--help``.
COMMAND_MODULES: tuple[str, ...] = (
    "gptq_tools.cli.download",
    "gptq_tools.cli.files",
    "gptq_tools.cli.verify",
    "gptq_tools.cli.quantize",
    "gptq_tools.cli.plan",
    "gptq_tools.cli.generate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptq-tools",
        description="Download, join, verify, quantize, plan and load very large GPTQ models.")
    parser.add_argument("--version", action="version", version=f"gptq-tools {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", metavar="N",
                        help="compute threads (default: $GPTQ_TOOLS_THREADS, else the physical cores); output "
                             "bytes are the same for any N")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbose else "%(message)s"))
    package_logger = logging.getLogger("gptq_tools")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(level)
    package_logger.propagate = False


def _configure_threads(requested: str | None) -> int:
    """Set the compute threads for this process (and the processes it starts) before torch is imported.

    ``OMP_WAIT_POLICY=PASSIVE`` (unless set): idle OpenMP workers sleep instead of spinning, so a busy machine
    does not collapse (measured, 2 cores under load 5: quantize of the tiny model 15.8 s passive, 65 s
    spinning, 20 s on one thread). Threads come from ``--threads``, ``GPTQ_TOOLS_THREADS``, else the physical
    cores.

    Raises:
        UsageError: the count is not a positive whole number.
    """
    text = requested if requested is not None else constants.threads_from_env()
    source = "--threads" if requested is not None else "GPTQ_TOOLS_THREADS"
    if text is None:
        threads = constants.physical_cores()
    elif text.strip().isdigit() and int(text) >= 1:
        threads = int(text)
    else:
        raise UsageError(f"{source} {text!r} is not a thread count; give a whole number of 1 or more "
                         f"(e.g. --threads 2)")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if text is not None and "torch" in sys.modules:  # already loaded (the CLI called from Python): set it
        sys.modules["torch"].set_num_threads(threads)
    return threads


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (also used by the console script)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        _configure_threads(args.threads)
    except GptqToolsError as exc:
        print(f"gptq-tools: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.no_progress:
        set_progress(False)
    try:
        return int(args.func(args) or 0)
    except GptqToolsError as exc:
        print(f"gptq-tools: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gptq-tools: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141


def run() -> None:
    """Entry point for the console script."""
    sys.exit(main())
