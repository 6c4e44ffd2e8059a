"""The ``gptq-tools`` command line (imports every stage below it): parses arguments and calls the library,
nothing more.

Each command module registers its sub-commands with ``register(subparsers)`` and sets ``func`` to a
function taking the parsed arguments and returning the exit status. Known errors become one line on
stderr and a non-zero exit; unknown errors keep their traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from .. import constants
from ..constants import __version__
from ..errors import GptqToolsError, UsageError
from ..progress import set_progress

#: Modules that register sub-commands, in the order their commands appear in ``--help``.
COMMAND_MODULES: tuple[str, ...] = (
    "gptq_tools.cli.download",
    "gptq_tools.cli.publish",
    "gptq_tools.cli.files",
    "gptq_tools.cli.verify",
    "gptq_tools.cli.quantize",
    "gptq_tools.cli.plan",
    "gptq_tools.cli.generate",
    "gptq_tools.cli.eval",
    "gptq_tools.cli.presets",
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors suggest the nearest command or option ("did you mean ...")."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        suggestion = _did_you_mean(self, message)
        super().error(message + (f"; did you mean {suggestion}?" if suggestion else ""))


def _did_you_mean(parser: argparse.ArgumentParser, message: str) -> str | None:
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        candidates = re.findall(r"'([^']*)'", choice.group(2))
        close = difflib.get_close_matches(choice.group(1), candidates, n=1, cutoff=0.5)
        return repr(close[0]) if close else None
    unknown = re.search(r"unrecognized arguments: (\S+)", message)
    if unknown and unknown.group(1).startswith("-"):
        options = {s[2:]: s for action in parser._actions for s in action.option_strings if s.startswith("--")}
        given = unknown.group(1).split("=", 1)[0].lstrip("-")
        close = difflib.get_close_matches(given, list(options), n=1, cutoff=0.7)
        return options[close[0]] if close else None
    return None


def _share_global_options(parser: argparse.ArgumentParser, subparsers: argparse._SubParsersAction) -> None:
    """Accept every top-level option (``-q``, ``-v``, ``--no-progress``, ...) after the sub-command too.

    Each sub-command gets a copy of the top-level option whose default is ``SUPPRESS``, so a value given after
    the sub-command replaces the one given before it and an absent one leaves it alone. Generic on purpose: an
    option added to the top-level parser later is shared without touching this function.
    """
    shared = [action for action in parser._actions
              if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))]
    for subparser in subparsers.choices.values():
        group = subparser.add_argument_group("global options (also accepted before the command)")
        for action in shared:
            # a sub-command's own option of the same name keeps its meaning (verify --quiet is sha256sum's)
            free = [option for option in action.option_strings if option not in subparser._option_string_actions]
            if not free:
                continue
            twin = copy.copy(action)
            twin.option_strings, twin.default = free, argparse.SUPPRESS
            group._add_action(twin)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    _share_global_options(parser, subparsers)
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
    args, extras = parser.parse_known_args(argv)
    if extras:  # blame the sub-command, whose usage shows what it takes
        command_parser = _subparsers_of(parser).choices.get(getattr(args, "command", None), parser)
        command_parser.error(f"unrecognized arguments: {' '.join(extras)}")
    _configure_logging(args.verbose, args.quiet)
    try:
        _configure_threads(args.threads)
    except GptqToolsError as exc:
        print(f"gptq-tools: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.no_progress:
        set_progress(False)
    try:
        with _quiet_stdout(args):
            return int(args.func(args) or 0)
    except GptqToolsError as exc:
        print(f"gptq-tools: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gptq-tools: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141


@contextlib.contextmanager
def _quiet_stdout(args: argparse.Namespace) -> Iterator[None]:
    """``-q`` is errors only: a command's summary on stdout goes too, unless the output is what was asked for
    (``--json``, the answers of ``generate``)."""
    if not args.quiet or getattr(args, "json", False) or args.command in _OUTPUT_IS_THE_PRODUCT:
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink):
        yield


#: Commands whose stdout is the result itself (not a summary), so ``-q`` leaves it alone.
_OUTPUT_IS_THE_PRODUCT = frozenset({"generate"})


def _subparsers_of(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def run() -> None:
    """Entry point for the console script."""
    sys.exit(main())
