"""``gptq-tools download REPO[:BRANCH]``: parses arguments, calls :func:`gptq_tools.hub.download`, prints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..units import format_size
from .common import add_wait_lock_argument


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``download`` sub-command."""
    parser = subparsers.add_parser(
        "download", help="download a Hub repository branch, verified and joined",
        description="Download a branch of a Hub repository into a folder: every file checked against the Hub's "
                    "SHA256 before it takes its name, killed downloads resumed, split parts joined on arrival.")
    parser.add_argument("repo", metavar="REPO[:BRANCH]",
                        help="NAMESPACE/NAME, optionally :BRANCH, or a preset name "
                             "(e.g. bloomz-176b-gptq:group_size_128g)")
    parser.add_argument("--revision", help="branch, tag or commit (instead of :BRANCH)")
    parser.add_argument("--local-dir", type=Path,
                        help="destination folder (default: ./NAME, or ./NAME-BRANCH for a non-default branch)")
    parser.add_argument("--include", action="append", metavar="GLOB", help="only files matching GLOB (repeatable)")
    parser.add_argument("--exclude", action="append", metavar="GLOB", help="skip files matching GLOB (repeatable)")
    parser.add_argument("--max-workers", type=int, default=8, help="parallel connections (default 8)")
    parser.add_argument("--join", dest="join", action="store_true", default=True,
                        help="join split parts once they are verified (default)")
    parser.add_argument("--no-join", dest="join", action="store_false", help="keep split parts as they are")
    parser.add_argument("--delete-parts", action="store_true", help="remove split parts after a verified join")
    parser.add_argument("--sha256", action="append", metavar="[NAME=]HEX",
                        help="expected SHA256 of a joined file (overrides SHA256SUMS and presets)")
    parser.add_argument("--force", action="store_true", help="replace local files of the same names with other bytes")
    parser.add_argument("--no-space-check", dest="check_space", action="store_false",
                        help="start even if download plus join do not fit on the disk")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--dry-run", action="store_true", help="show what would be fetched and whether it fits")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout (for CI)")
    add_wait_lock_argument(parser, what="download into the same folder")
    parser.set_defaults(func=run_download)


def _default_local_dir(repo: str, revision: str | None) -> Path:
    from ..checkpoint.presets import parse_model_spec

    return parse_model_spec(repo, revision=revision).local_dir()


def run_download(args: argparse.Namespace) -> int:
    """Run ``gptq-tools download``; prints the result (JSON with ``--json``)."""
    from ..hub import download

    local_dir = args.local_dir or _default_local_dir(args.repo, args.revision)
    result = download(args.repo, local_dir=local_dir, revision=args.revision, include=args.include,
                      exclude=args.exclude, max_workers=args.max_workers, join=args.join, sha256=args.sha256,
                      force=args.force, delete_parts=args.delete_parts, check_space=args.check_space,
                      dry_run=args.dry_run, token=args.token, wait_lock=args.wait_lock)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif args.dry_run:
        _print_plan(result.plan)
    else:
        _print_result(result)
    return 0


def _print_plan(plan: object) -> None:
    data = plan.to_dict()  # type: ignore[attr-defined]
    print(f"{data['repo_id']}@{data['revision']} = commit {data['commit']} -> {data['local_dir']}")
    for item in data["files"]:
        state = {"present": "have (verified)", "partial": f"resume after {format_size(item['have_bytes'])}",
                 "missing": "fetch"}[item["status"]]
        print(f"  {state:<28} {format_size(item['size']):>10}  {item['path']}")
    for join in data["joins"]:
        if join["expected_sha256"]:
            check = f"expected sha256 from {join['expected_from']}: {join['expected_sha256']}"
        elif join["expected_from"] == "SHA256SUMS":
            check = "expected sha256 from SHA256SUMS in the repository"
        else:
            check = "no published sha256: only the parts are verified"
        status = "already joined" if join["done"] else "join"
        print(f"  {status:<28} {format_size(join['size']):>10}  {join['output']} <- {len(join['parts'])} parts "
              f"({check})")
    fits = "fits" if data["fits"] else "DOES NOT FIT"
    print(f"to download: {format_size(data['download_bytes'])}; to join: {format_size(data['join_bytes'])}; "
          f"free: {format_size(data['free_bytes'])} ({fits})")


def _print_result(result: object) -> None:
    data = result.to_dict()  # type: ignore[attr-defined]
    if data["already_complete"]:
        joined = [j["output"] for j in data["joins"]]
        print(f"{data['repo_id']}@{data['revision']} (commit {data['commit'][:12]}) in {data['local_dir']}: already "
              f"complete, {len(data['files'])} file(s) verified{', joined: ' + ', '.join(joined) if joined else ''}; "
              f"nothing to download")
        return
    seconds = max(data["seconds"], 1e-9)
    rate = format_size(int(data["bytes_downloaded"] / seconds))
    print(f"{data['repo_id']}@{data['revision']} (commit {data['commit'][:12]}) in {data['local_dir']}: "
          f"{len(data['downloaded'])} file(s), {format_size(data['bytes_downloaded'])} downloaded and verified "
          f"in {seconds:.1f}s ({rate}/s)")
    for joined in data["joined"]:
        check = f"matches {joined['expected_from']}" if joined["verified"] else "no published hash to check"
        print(f"joined {joined['output']}: sha256 {joined['sha256']} ({check})")
    if data["sha256sums"]:
        print(f"wrote {data['sha256sums']}: the verified SHA256 of every file (the repository ships none); check "
              f"the folder later with: gptq-tools verify -c {data['sha256sums']}")
