"""``gptq-tools verify``: argument parsing and sha256sum-exact printing only (the work is in
:mod:`gptq_tools.files.verify`).

Output follows GNU coreutils ``sha256sum`` byte for byte where the two overlap: ``NAME: OK`` /
``NAME: FAILED`` / ``NAME: FAILED open or read`` on stdout, the system's reason and the summary
warnings on stderr (prefixed ``gptq-tools:`` instead of ``sha256sum:``), names written as the bytes
they are, and the same exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..files.manifest import IMPROPER, MalformedLine, escape_name
from ..files.quoting import quote_name

_PREFIX = b"gptq-tools: "
_CHECK_OPTIONS = ("ignore_missing", "strict")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``verify`` sub-command."""
    parser = subparsers.add_parser(
        "verify", help="sha256sum -c compatible checks, hashes, parts without joining, a Hub repository, structure",
        description="With -c, check the files that sha256sum-format manifests list (- is standard input) and print "
                    "'NAME: OK' / 'NAME: FAILED' exactly as sha256sum -c does, with its options and exit status. "
                    "With only FILEs, print 'HASH  FILE' like sha256sum. --sha256 HEX FILE checks one file; "
                    "--parts hashes the file that parts would join into without writing it; --remote checks a Hub "
                    "repository's manifest against the Hub's own SHA256s without downloading the weights; "
                    "--structure validates safetensors files and GPTQ checkpoint folders.")
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="with -c: manifests (default: standard input); otherwise files to hash or check")
    parser.add_argument("-c", "--check", action="store_true",
                        help="read SHA256 sums from the FILEs and check them (like sha256sum -c)")
    parser.add_argument("--manifest", type=Path, metavar="SHA256SUMS",
                        help="check FILEs (default: all it lists) against this manifest; with --remote, check the "
                             "repository against it instead of its own SHA256SUMS")
    parser.add_argument("--sha256", help="expected SHA256 of the one FILE given")
    parser.add_argument("--ignore-missing", action="store_true", help="don't fail or report status for missing files")
    parser.add_argument("--quiet", dest="mode", action="store_const", const="quiet",
                        help="don't print OK for each successfully verified file")
    parser.add_argument("--status", dest="mode", action="store_const", const="status",
                        help="don't output anything, the exit status shows success")
    parser.add_argument("--strict", action="store_true", help="exit non-zero for improperly formatted checksum lines "
                        "(with --remote: also for repository files the manifest does not list)")
    parser.add_argument("-w", "--warn", dest="mode", action="store_const", const="warn",
                        help="warn about improperly formatted checksum lines")
    parser.add_argument("--remote", metavar="REPO[:BRANCH]",
                        help="check a Hub repository (or preset) against its SHA256SUMS without downloading it")
    parser.add_argument("--revision", help="with --remote: branch, tag or commit (instead of :BRANCH)")
    parser.add_argument("--token", help="with --remote: Hub token (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--parts", nargs="+", type=Path, metavar="PART",
                        help="verify the joined file's hash straight from these parts (or a folder / one part)")
    parser.add_argument("--part-hashes", action="store_true",
                        help="with --parts: also hash each part on its own (automatic when the manifest lists them)")
    parser.add_argument("--structure", action="store_true",
                        help="validate structure: safetensors rules, GPTQ checkpoint config vs tensors")
    parser.add_argument("--workers", type=int, help="files hashed at once (default: number of cores)")
    parser.add_argument("--json", action="store_true", help="print results as JSON on stdout (for CI)")
    parser.add_argument("--junit", type=Path, metavar="FILE", help="also write a JUnit XML report to FILE (for CI)")
    parser.set_defaults(func=run_verify, mode=None)


def run_verify(args: argparse.Namespace) -> int:
    """Run ``gptq-tools verify``; returns the exit status."""
    from ..errors import UsageError

    checking = args.check or args.manifest is not None or args.remote or args.sha256 is not None
    used = [f"--{name.replace('_', '-')}" for name in _CHECK_OPTIONS if getattr(args, name)]
    used += [f"--{args.mode}"] if args.mode else []
    if used and not checking:
        raise UsageError(f"the {used[0]} option is meaningful only when verifying checksums (-c, --manifest, "
                         f"--remote or --sha256)")
    if args.structure or args.parts:
        return _structure_or_parts(args)
    if args.remote:
        return _remote(args)
    if args.check and args.manifest is None:
        return _manifests(args)
    if checking:
        return _listed_files(args)
    if not args.files:
        raise UsageError("nothing to verify: give FILEs to hash, -c SHA256SUMS, --sha256 HEX FILE, --parts, "
                         "--remote REPO or --structure")
    return _hashes(args)


# -- output ------------------------------------------------------------------------------------------------
def _out(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data + b"\n")
    sys.stdout.buffer.flush()


def _err(data: bytes) -> None:
    sys.stderr.flush()
    sys.stderr.buffer.write(_PREFIX + data + b"\n")
    sys.stderr.buffer.flush()


def _q(name: str) -> bytes:
    return quote_name(os.fsencode(name))


def _shown(name: str, mode: str | None) -> bytes:
    """A name on a check line: escaped (with a leading backslash) only when it holds a newline."""
    raw = os.fsencode(name)
    if mode == "status" or b"\n" not in raw:
        return raw
    return b"\\" + escape_name(raw)[0]


def _plural(count: int, one: str, many: str) -> bytes:
    return f"WARNING: {count} {one if count == 1 else many}".encode()


def _print_checks(source: str, results: Any, malformed: Any, *, mode: str | None, ignore_missing: bool,
                  stdout: bool = True) -> None:
    """Print one manifest's outcome as sha256sum -c does (``stdout=False``: stderr only, for --json)."""
    items = sorted([*results, *malformed], key=lambda item: item.line or 0)
    for item in items:
        if isinstance(item, MalformedLine):
            if item.reason != IMPROPER and mode != "status":
                _err(_q(source) + f": {item.line}: {item.reason}; line skipped".encode())
            elif mode == "warn":
                _err(_q(source) + f": {item.line}: {IMPROPER}".encode())
            continue
        status = item.status
        if status == "MISSING":
            _err(_q(item.name) + b": " + item.detail.encode())
        elif status == "FAILED" and item.note and mode != "status":
            _err(_q(item.name) + b": " + item.note.encode())
        elif status == "UNVERIFIED" and mode != "status":
            _err(_q(item.name) + b": NOT verified: " + item.detail.encode())
        if not stdout or mode == "status" or status == "SKIPPED" or (status == "OK" and mode == "quiet"):
            continue
        word = {"OK": b"OK", "FAILED": b"FAILED", "MISSING": b"FAILED open or read"}.get(status, b"UNVERIFIED")
        _out(_shown(item.name, mode) + b": " + word)
    if not results:
        _err(_q(source) + b": no properly formatted checksum lines found")
        return
    if mode == "status":
        return
    counts = {status: sum(1 for r in results if r.status == status) for status in ("OK", "FAILED", "MISSING")}
    if malformed:
        _err(_plural(len(malformed), "line is improperly formatted", "lines are improperly formatted"))
    if counts["MISSING"]:
        _err(_plural(counts["MISSING"], "listed file could not be read", "listed files could not be read"))
    if counts["FAILED"]:
        _err(_plural(counts["FAILED"], "computed checksum did NOT match", "computed checksums did NOT match"))
    if ignore_missing and not counts["OK"]:
        _err(_q(source) + b": no file was verified")


def _print_json(payload: dict[str, Any], results: list[Any]) -> None:
    from .common import NOT_OK

    failed = sum(1 for r in results if r.status in NOT_OK)
    print(json.dumps({"ok": payload.pop("ok"), "failed": failed, "results": [r.to_dict() for r in results],
                      **payload}, indent=2))


def _junit(path: Path | None, suites: list[tuple[str, tuple[Any, ...]]]) -> None:
    if path is None:
        return
    from ..files.junit import JunitSuite, write_junit

    write_junit(path, [JunitSuite(name, cases) for name, cases in suites])


# -- modes -------------------------------------------------------------------------------------------------
def _manifests(args: argparse.Namespace) -> int:
    from ..files.junit import cases_from_checks
    from ..files.verify import check_manifests

    reports = check_manifests(args.files or ["-"], ignore_missing=args.ignore_missing, workers=args.workers)
    for report in reports:
        if report.error is not None:
            _err(_q(report.source) + b": " + report.error.encode() if report.error_is_os
                 else b"error: " + report.error.encode())
            continue
        _print_checks(report.source, report.results, report.malformed, mode=args.mode,
                      ignore_missing=args.ignore_missing, stdout=not args.json)
    ok = all(report.passed(strict=args.strict) for report in reports)
    if args.json:
        _print_json({"ok": ok, "manifests": [{k: v for k, v in r.to_dict().items() if k != "results"}
                                             for r in reports]}, [c for r in reports for c in r.results])
    _junit(args.junit, [(r.source, cases_from_checks(r.results, r.malformed, strict=args.strict, source=r.source))
                        for r in reports])
    return 0 if ok else 1


def _listed_files(args: argparse.Namespace) -> int:
    """``--sha256 HEX FILE`` or ``--manifest M [FILE...]``: check, printed like ``sha256sum -c``."""
    from ..files.junit import cases_from_checks
    from ..files.verify import verify_files

    if args.check and args.manifest is not None:
        from ..errors import UsageError

        raise UsageError("give the manifest either as -c MANIFEST or as --manifest MANIFEST FILE..., not both")
    results = verify_files(args.files, sha256=args.sha256, manifest=args.manifest, workers=args.workers,
                           ignore_missing=args.ignore_missing)
    source = str(args.manifest) if args.manifest is not None else "--sha256"
    _print_checks(source, results, [], mode=args.mode, ignore_missing=args.ignore_missing, stdout=not args.json)
    ok = bool(results) and all(r.status in ("OK", "SKIPPED") for r in results) and any(r.ok for r in results)
    if args.json:
        _print_json({"ok": ok}, results)
    _junit(args.junit, [(source, cases_from_checks(results))])
    return 0 if ok else 1


def _hashes(args: argparse.Namespace) -> int:
    """``verify FILE...`` with nothing to compare with: ``HASH  FILE`` lines, as ``sha256sum FILE...``."""
    from ..files.junit import cases_from_checks
    from ..files.verify import hash_files

    results = hash_files(args.files, workers=args.workers)
    for result in results:
        if result.status == "MISSING":
            _err(_q(result.name) + b": " + result.detail.encode())
        elif not args.json:
            name, escaped = escape_name(os.fsencode(result.name))
            _out((b"\\" if escaped else b"") + result.actual.encode() + b"  " + name)
    ok = all(r.status != "MISSING" for r in results)
    if args.json:
        _print_json({"ok": ok}, results)
    _junit(args.junit, [("sha256", cases_from_checks(results))])
    return 0 if ok else 1


def _remote(args: argparse.Namespace) -> int:
    from ..files.junit import cases_from_checks
    from ..hub.verify_remote import verify_remote

    report = verify_remote(args.remote, revision=args.revision, manifest=args.manifest, token=args.token)
    if not args.json and args.mode != "status":
        print(f"{report.repo_id}@{report.revision} = commit {report.commit}; checking against {report.source}",
              flush=True)
    _print_checks(report.source, report.results, report.malformed, mode=args.mode, ignore_missing=False,
                  stdout=not args.json)
    if report.uncovered and args.mode != "status":
        shown = ", ".join(report.uncovered[:20]) + (", ..." if len(report.uncovered) > 20 else "")
        _err(_plural(len(report.uncovered), f"file in {report.repo_id}@{report.revision} is not listed in "
                     f"{report.source}: {shown}", f"files in {report.repo_id}@{report.revision} are not listed in "
                     f"{report.source}: {shown}"))
    if report.results and not report.count("OK") and args.mode != "status":
        _err(_q(report.source) + b": no file was verified")
    ok = report.passed(strict=args.strict)
    if args.json:
        payload = {k: v for k, v in report.to_dict().items() if k != "results"}
        _print_json({"ok": ok, **payload}, list(report.results))
    cases = cases_from_checks(report.results, report.malformed, strict=args.strict, source=report.source)
    if args.strict:
        from ..files.junit import JunitCase

        cases += tuple(JunitCase(path, "failure", "not listed in the manifest") for path in report.uncovered)
    _junit(args.junit, [(f"{report.repo_id}@{report.commit}", cases)])
    return 0 if ok else 1


def _structure_or_parts(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..files.junit import cases_from_checks
    from ..files.verify import FileCheck, verify_parts
    from .common import report_checks, structure_check, structure_report

    if args.structure:
        results = [structure_check(Path(path)) for path in args.files]
        if not results:
            raise UsageError("--structure needs at least one file or folder")
        status = structure_report(results, as_json=args.json)
        _junit(args.junit, [("structure", cases_from_checks(results))])
        return status
    else:
        parts: Any = args.parts[0] if len(args.parts) == 1 else args.parts
        manifest = args.manifest if args.manifest is not None else (
            args.files[0] if args.check and len(args.files) == 1 else None)
        results = [verify_parts(parts, sha256=args.sha256, manifest=manifest, part_hashes=args.part_hashes)]
    status = report_checks(results, as_json=args.json, check_type=FileCheck)
    _junit(args.junit, [("parts", cases_from_checks(results))])
    return status
