"""``verify --remote REPO[:BRANCH]``: check a published repository's manifest against the Hub, downloading no weights.

The Hub stores the SHA256 of every LFS file (the LFS oid in its file listing). This module resolves the
branch to one commit (:mod:`gptq_tools.hub.remote`, the same client the downloader uses), reads the
manifest (``--manifest FILE``, else the repository's ``SHA256SUMS`` at that commit, else a preset's
published hashes) and compares each entry with the listing: LFS files by their oid, small git files by
fetching and hashing them (and checking their git object id). A manifest entry for a joined file whose
parts are in the repository is reported as checkable only by download, after its parts' hashes (where the
manifest lists them) are checked. Files in the repository that the manifest does not cover are named.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import PurePosixPath

from ..checkpoint.presets import Preset
from ..constants import MANIFEST_MAX_BYTES
from ..errors import HubError, ManifestError
from ..files.manifest import MalformedLine, ManifestEntry, ManifestParser, read_manifest_bytes
from ..files.parts import parse_part_name
from ..files.verify import FileCheck
from .remote import RemoteFile, RepoSpec, ResolvedRepo, hub_errors, parse_spec, resolve_repo

logger = logging.getLogger(__name__)

#: Files a repository holds that are git's plumbing, not content a manifest is expected to list.
_NOT_CONTENT = frozenset({".gitattributes"})


@dataclass(frozen=True)
class RemoteReport:
    """The outcome of :func:`verify_remote`.

    ``results`` follow the manifest's lines (status OK, FAILED, MISSING: not in the repository, or
    UNVERIFIED: a joined file only a download can check); ``uncovered`` are the repository's files the
    manifest does not list (neither by name nor as a part of a listed joined file).
    """

    repo_id: str
    revision: str
    commit: str
    source: str
    results: tuple[FileCheck, ...]
    malformed: tuple[MalformedLine, ...]
    uncovered: tuple[str, ...]

    def count(self, status: str) -> int:
        return sum(1 for result in self.results if result.status == status)

    def passed(self, *, strict: bool = False) -> bool:
        """Something matched and nothing mismatched or is missing (with ``strict``: every file covered too)."""
        return (self.count("OK") > 0 and self.count("FAILED") == 0 and self.count("MISSING") == 0
                and not (strict and (self.uncovered or self.malformed)))

    def to_dict(self) -> dict[str, object]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "source": self.source,
                "results": [r.to_dict() for r in self.results], "uncovered": list(self.uncovered),
                "malformed": [{"line": m.line, "reason": m.reason} for m in self.malformed]}


def verify_remote(spec: str, *, revision: str | None = None, manifest: str | os.PathLike[str] | None = None,
                  endpoint: str | None = None, token: str | bool | None = None) -> RemoteReport:
    """Check ``spec``'s manifest against the Hub's own SHA256s, pinned to the commit the branch points at.

    Args:
        spec: ``NAMESPACE/NAME[:BRANCH]`` or ``PRESET[:BRANCH]``.
        revision: branch, tag or commit (instead of ``:BRANCH``).
        manifest: a local manifest to check the repository against (default: the repository's
            ``SHA256SUMS``, else the preset's published hashes).
        endpoint: Hub base URL (default: huggingface_hub's, ``HF_ENDPOINT``).
        token: Hub token (None: huggingface_hub finds one).

    Returns:
        The :class:`RemoteReport`.

    Raises:
        ManifestError: no manifest to check against, or it cannot be read.
        RepoNotFoundError, RevisionNotFoundError, HubAuthError, HubError: from the Hub.
        UsageError: ``spec`` is not a repository or preset.
    """
    repo_spec = parse_spec(spec, revision=revision)
    repo = resolve_repo(repo_spec, endpoint=endpoint, token=token)
    listing = {f.path: f for f in repo.files}
    where = f"{repo.repo_id}@{repo.revision}"
    joined = _joined_files(listing, repo_spec)
    if manifest is not None:
        source, data = str(manifest), read_manifest_bytes(manifest)
    elif "SHA256SUMS" in listing:
        source, data = f"{where}/SHA256SUMS", _fetch(repo, listing["SHA256SUMS"], token)
    elif repo_spec.preset is not None:
        source, data = f"preset/{repo_spec.preset.name}", _preset_manifest(repo_spec.preset, repo_spec.revision)
    else:
        raise ManifestError(f"{where} (commit {repo.commit}) has no SHA256SUMS and no manifest was given; "
                            f"pass --manifest FILE")
    parsed = ManifestParser().parse(data, source=source)
    listed = {_repo_path(entry.name) for entry in parsed.entries}
    results = tuple(_check_entry(entry, repo, listing, joined, listed, token) for entry in parsed.entries)
    covered = listed | {part for name in listed for part in joined.get(name, ())}
    if manifest is None:
        covered.add("SHA256SUMS")
    uncovered = tuple(path for path in sorted(listing) if path not in covered and path not in _NOT_CONTENT)
    logger.info("%s is commit %s; %d manifest entries, %d files not covered", where, repo.commit, len(results),
                len(uncovered))
    return RemoteReport(repo.repo_id, repo.revision, repo.commit, source, results, tuple(parsed.malformed),
                        uncovered)


def _joined_files(listing: dict[str, RemoteFile], repo_spec: RepoSpec) -> dict[str, tuple[str, ...]]:
    """``{joined file: its parts in the repository}``, from part names and, for a preset, its file table."""
    groups: dict[str, list[str]] = {}
    for path in sorted(listing):
        pure = PurePosixPath(path)
        part = parse_part_name(pure.name)
        if part is not None:
            groups.setdefault(str(pure.with_name(part.output_name)), []).append(path)
    if repo_spec.preset is not None:
        for name, info in repo_spec.preset.branch_files(repo_spec.revision).items():
            parts = [p for p in info.get("parts", []) if p in listing]
            if parts:
                groups[name] = parts
    return {name: tuple(parts) for name, parts in groups.items()}


def _repo_path(name: str) -> str:
    """A manifest name as a repository path: ``sha256sum ./*`` writes ``./NAME``, the Hub lists ``NAME``."""
    while name.startswith("./"):
        name = name[2:]
    return name


def _preset_manifest(preset: Preset, branch: str) -> bytes:
    lines = [f"{info['sha256']}  {name}\n" for name, info in preset.branch_files(branch).items()
             if info.get("sha256")]
    return "".join(lines).encode()


def _check_entry(entry: ManifestEntry, repo: ResolvedRepo, listing: dict[str, RemoteFile],
                 joined: dict[str, tuple[str, ...]], listed: set[str], token: str | bool | None) -> FileCheck:
    where = f"{repo.repo_id}@{repo.revision} (commit {repo.commit})"
    path = _repo_path(entry.name)
    found = listing.get(path)
    url = repo.url(path) if found is not None else ""
    if found is None:
        parts = joined.get(path)
        if not parts:
            return FileCheck(entry.name, "", entry.sha256, None, "MISSING", f"not in {where}", line=entry.line)
        unchecked = [p for p in parts if p not in listed]
        detail = (f"a joined file: {len(parts)} parts in the repository"
                  + (f" ({len(unchecked)} with no hash in the manifest)" if unchecked else ", each checked")
                  + "; the joined SHA256 can only be checked by downloading it")
        return FileCheck(entry.name, "", entry.sha256, None, "UNVERIFIED", detail, line=entry.line)
    if found.sha256 is not None:
        actual = found.sha256
        source = "the Hub's LFS SHA256"
    else:
        actual = hashlib.sha256(_fetch(repo, found, token)).hexdigest()
        source = "the SHA256 of the file as served"
    if actual == entry.sha256:
        return FileCheck(entry.name, url, entry.sha256, actual, "OK", line=entry.line)
    return FileCheck(entry.name, url, entry.sha256, actual, "FAILED", f"{source} is {actual}", line=entry.line)


def _fetch(repo: ResolvedRepo, remote_file: RemoteFile, token: str | bool | None) -> bytes:
    """The bytes of a small file of the pinned commit (a manifest, a config), bounded and checked."""
    from huggingface_hub import get_session
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    path, size = remote_file.path, remote_file.size
    where = f"{repo.repo_id}@{repo.commit}: {path}"
    if size > MANIFEST_MAX_BYTES:
        raise HubError(f"{where}: {size} bytes is too large to fetch for a check (at most {MANIFEST_MAX_BYTES})")
    data = bytearray()
    with hub_errors(repo.repo_id, repo.commit, endpoint=repo.endpoint):
        with get_session().stream("GET", repo.url(path), headers=build_hf_headers(token=token),
                                  follow_redirects=True, timeout=60) as response:
            hf_raise_for_status(response)
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > size:
                    break
    expected_oid = remote_file.sha256 or remote_file.git_oid
    actual_oid = (hashlib.sha256(data).hexdigest() if remote_file.sha256
                  else hashlib.sha1(b"blob %d\0" % len(data) + bytes(data)).hexdigest())
    if len(data) != size or actual_oid != expected_oid:
        raise HubError(f"{where}: the Hub listed {size} bytes with id {expected_oid} but served {len(data)} bytes "
                       f"with id {actual_oid}; retry, or report the repository")
    return bytes(data)
