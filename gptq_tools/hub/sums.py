"""The ``SHA256SUMS`` a download leaves behind when the repository ships none, so that ``gptq-tools verify -c
DIR/SHA256SUMS`` (the CI templates, a later audit) can check the folder without the Hub.

Only hashes that were verified go in: LFS files and parts against the Hub's SHA256, small git files against
their git SHA1 (their SHA256 is computed from the verified bytes), joined files from their verified parts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..files.manifest import write_manifest
from ..files.pipeline import sha256_file
from .plan import MANIFEST_NAMES, DownloadPlan
from .state import LocalState

logger = logging.getLogger(__name__)

#: The name of the manifest a download writes.
SUMS_NAME = "SHA256SUMS"


def verified_sha256s(plan: DownloadPlan, state: LocalState) -> dict[str, str]:
    """``{name: sha256}`` of every file of ``plan`` (and joined output) that is on disk and recorded as verified
    with unchanged size and mtime; files that are not (deleted parts, a file changed since) are left out."""
    entries: dict[str, str] = {}
    for planned in plan.files:
        remote = planned.remote
        if remote.path in MANIFEST_NAMES or not state.is_verified(remote.path, remote.checksum):
            continue
        algorithm, digest = remote.checksum
        entries[remote.path] = digest if algorithm == "sha256" else sha256_file(state.local_dir / remote.path)
    for join in plan.joins:
        record = state.verified_record(join.output)
        if record is None or record.get("algorithm") != "sha256":
            continue
        digest = str(record["hash"])
        if state.is_verified(join.output, ("sha256", digest)):
            entries[join.output] = digest
    return dict(sorted(entries.items()))


def write_download_sums(plan: DownloadPlan, state: LocalState) -> Path | None:
    """Write ``SHA256SUMS`` into the download folder unless the repository ships a manifest of its own.

    Returns:
        The manifest written, or None (the repository has one, or nothing was verified).
    """
    if any(f.path in MANIFEST_NAMES for f in plan.repo.files):
        return None
    entries = verified_sha256s(plan, state)
    if not entries:
        return None
    path = state.local_dir / SUMS_NAME
    write_manifest(path, entries, merge=False)
    logger.info("%s: %d verified SHA256 written (the repository ships no SHA256SUMS)", path, len(entries))
    return path
