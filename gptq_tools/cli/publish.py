"""``gptq-tools publish FOLDER REPO[:BRANCH]``: parses arguments, calls :func:`gptq_tools.hub.publish.publish`,
prints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..units import format_size


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``publish`` sub-command."""
    parser = subparsers.add_parser(
        "publish", help="upload a model folder to a Hub branch, every file under the per-file limit, with "
                        "SHA256SUMS and a model card",
        description="Publish FOLDER to the Hub repository REPO (branch BRANCH, created when missing) in one commit: "
                    "files over --max-file-size are resharded or split, SHA256SUMS and a README.md model card are "
                    "written, all in a staging folder beside FOLDER (FOLDER is only read), then uploaded with "
                    "huggingface_hub. Run it again after an interruption: only what is missing is sent.")
    parser.add_argument("folder", type=Path, metavar="FOLDER", help="the model folder (GPTQ or any safetensors model)")
    parser.add_argument("repo", metavar="REPO[:BRANCH]", help="NAMESPACE/NAME, optionally :BRANCH (default main)")
    parser.add_argument("--revision", help="the branch (instead of :BRANCH)")
    parser.add_argument("--max-file-size", default="50GB",
                        help="largest file to upload (default 50GB, the Hub's per-file limit; GiB = 2^30, GB = 10^9, "
                             "a bare number is bytes)")
    parser.add_argument("--oversize", choices=["reshard", "split"], default="reshard",
                        help="a larger safetensors weights file becomes valid shards + index (reshard, default: "
                             "every loader reads them, no join) or byte parts NAME.JOINBEFOREUSE.split-a ... "
                             "(split: the original file's bytes and SHA256 survive); other large files are split")
    parser.add_argument("--staging-dir", type=Path, help="where parts, shards, SHA256SUMS and the card are written "
                        "(default: FOLDER.publish beside FOLDER)")
    parser.add_argument("--overwrite-card", action="store_true",
                        help="upload the generated model card even though FOLDER has its own README.md")
    parser.add_argument("-m", "--message", help="commit message")
    parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be sent (path, size, sha256); write "
                        "and send nothing")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.set_defaults(func=run_publish)


def run_publish(args: argparse.Namespace) -> int:
    """Run ``gptq-tools publish``; prints the plan (dry run) or the commit (JSON with ``--json``)."""
    from ..hub.publish import describe, publish

    result = publish(args.folder, args.repo, revision=args.revision, max_file_size=args.max_file_size,
                     oversize=args.oversize, staging_dir=args.staging_dir, overwrite_card=args.overwrite_card,
                     message=args.message, token=args.token, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    plan = result.plan
    if args.dry_run:
        print("\n".join(describe(plan)))
        print("dry run: nothing written, nothing sent")
        return 0
    print(f"published {plan.folder} to {plan.repo_id}@{plan.revision}: commit {result.commit} "
          f"({len(plan.files)} files, {format_size(plan.total_bytes)})")
    for join in plan.joins:
        print(f"  {join.output}: {len(join.parts)} parts, joined SHA256 {join.sha256} in SHA256SUMS")
    for reshard in plan.reshards:
        print(f"  {reshard.source}: {len(reshard.shards)} shards with {reshard.index}")
    for path in result.deleted:
        print(f"  deleted {path} (left by an earlier publish)")
    print(f"check it: gptq-tools verify --remote {plan.repo_id}:{plan.revision}")
    print(f"staging folder kept (delete it when done): {plan.staging}")
    return 0
