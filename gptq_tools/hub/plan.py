"""Planning a download: which files, what is already here, which parts to join, and whether it fits."""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (
    ChecksumMismatchError,
    InsufficientSpaceError,
    NotAFileError,
    NotAFolderError,
    OutputExistsError,
    OutputNotWritableError,
    UsageError,
)
from ..files.names import check_no_clashes, validate_relative_name
from ..files.parts import parse_part_name
from ..files.pipeline import WholeHasher, file_segments, run_pipeline, sha256_file
from ..units import format_size
from .remote import RemoteFile, ResolvedRepo
from .state import LocalState

logger = logging.getLogger(__name__)

#: Manifests in a repository that publish whole-file hashes (sha256sum format).
MANIFEST_NAMES = ("SHA256SUMS", "SHA256SUMS.txt", "sha256sums.txt")


@dataclass(frozen=True)
class PlannedFile:
    """A repository file and what the local folder holds of it (``present``, ``partial`` or ``missing``)."""

    remote: RemoteFile
    status: str
    have_bytes: int = 0


@dataclass(frozen=True)
class PlannedJoin:
    """A set of split parts to join into ``output``, and the hash the joined file must have."""

    output: str
    parts: tuple[str, ...]
    size: int
    expected_sha256: str | None
    source: str
    done: bool = False


@dataclass(frozen=True)
class DownloadPlan:
    """Everything :func:`gptq_tools.hub.download` will do, computed without transferring a file."""

    repo: ResolvedRepo
    local_dir: Path
    files: tuple[PlannedFile, ...]
    joins: tuple[PlannedJoin, ...]
    download_bytes: int
    join_bytes: int
    free_bytes: int
    replaced: tuple[str, ...] = field(default_factory=tuple)

    @property
    def needed_bytes(self) -> int:
        """Bytes the download and the joins will add to the disk."""
        return self.download_bytes + self.join_bytes

    @property
    def fits(self) -> bool:
        """Whether the free space covers :attr:`needed_bytes`."""
        return self.needed_bytes <= self.free_bytes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (used by ``--dry-run --json``)."""
        return {
            "repo_id": self.repo.repo_id, "revision": self.repo.revision, "commit": self.repo.commit,
            "local_dir": str(self.local_dir),
            "files": [{"path": f.remote.path, "size": f.remote.size, "algorithm": f.remote.checksum[0],
                       "hash": f.remote.checksum[1], "status": f.status, "have_bytes": f.have_bytes}
                      for f in self.files],
            "joins": [{"output": j.output, "parts": list(j.parts), "size": j.size,
                       "expected_sha256": j.expected_sha256, "expected_from": j.source, "done": j.done}
                      for j in self.joins],
            "download_bytes": self.download_bytes, "join_bytes": self.join_bytes,
            "needed_bytes": self.needed_bytes, "free_bytes": self.free_bytes, "fits": self.fits,
        }


def select_files(repo: ResolvedRepo, include: list[str] | None, exclude: list[str] | None) -> list[RemoteFile]:
    """The files of ``repo`` matching ``include`` and not ``exclude`` (fnmatch globs, as huggingface_hub).

    Raises:
        UsageError: nothing matches (the message lists what the branch has).
    """
    from huggingface_hub.utils import filter_repo_objects

    chosen = list(filter_repo_objects(repo.files, allow_patterns=include or None, ignore_patterns=exclude or None,
                                      key=lambda f: f.path))
    if not chosen:
        names = ", ".join(f.path for f in repo.files[:20]) or "no files"
        raise UsageError(f"{repo.repo_id}@{repo.revision}: no file matches --include {include or '*'} "
                         f"--exclude {exclude or '-'}; the branch has: {names}")
    return chosen


def find_joins(repo: ResolvedRepo, files: list[RemoteFile], *, sha256: dict[str, str]) -> list[PlannedJoin]:
    """Part sets among ``files`` (``*.JOINBEFOREUSE.split-a.*`` names, or the preset's parts lists).

    Raises:
        UsageError: a part set is incomplete in the selection, or ``--sha256`` names an unknown output.
    """
    by_path = {f.path: f for f in repo.files}
    chosen = {f.path for f in files}
    groups: dict[str, list[str]] = {}
    for path in sorted(chosen):
        output = _joined_name(path)
        if output is not None:
            groups.setdefault(output, []).append(path)
    preset_files = _preset_files(repo)
    for output, info in preset_files.items():
        if info.get("parts") and set(info["parts"]) <= chosen:
            groups[output] = list(info["parts"])
    _check_outputs(repo, groups, chosen)
    joins = []
    for output, parts in sorted(groups.items()):
        parts = sorted(parts, key=_part_position) if output not in preset_files else parts
        _check_complete(repo, output, parts, by_path, chosen)
        expected, source = _expected_hash(output, sha256, preset_files, repo)
        joins.append(PlannedJoin(output, tuple(parts), sum(by_path[p].size for p in parts), expected, source))
    unknown = set(sha256) - {j.output for j in joins} - {""}
    if unknown:
        raise UsageError(f"--sha256 names {', '.join(sorted(unknown))}, which is not a joined file of this download; "
                         f"joined files: {', '.join(j.output for j in joins) or 'none'}")
    if "" in sha256 and len(joins) != 1:
        raise UsageError(f"--sha256 without a name needs exactly one file to join, this download has {len(joins)}; "
                         f"write it as --sha256 NAME=HEX")
    return joins


def _check_outputs(repo: ResolvedRepo, groups: dict[str, list[str]], chosen: set[str]) -> None:
    """Joined files are named after their parts, which come from the listing: they must stay inside the
    folder and must not collide with a downloaded file (or need one to be a folder).

    Raises:
        UnsafeNameError: an output name is unsafe or clashes with a file's path.
        UsageError: an output has the name of a file the repository also has.
    """
    where = f"{repo.repo_id}@{repo.revision}"
    for output, parts in groups.items():
        validate_relative_name(output, what=f"{where}: the file that parts {', '.join(parts[:2])}... join into,")
        if output in chosen:
            raise UsageError(f"{where}: parts {', '.join(parts)} join into {output}, which the repository also has "
                             f"as a file; pass --no-join, or --exclude one of them")
    check_no_clashes([*chosen, *groups], what=f"{where} (files and joined files)")


def _preset_files(repo: ResolvedRepo) -> dict[str, dict[str, Any]]:
    if repo.preset is None or repo.preset.repo_id != repo.repo_id or repo.revision not in repo.preset.branches:
        return {}
    return repo.preset.branch_files(repo.revision)


def _check_complete(repo: ResolvedRepo, output: str, parts: list[str], by_path: dict[str, RemoteFile],
                    chosen: set[str]) -> None:
    siblings = {p for p in by_path if _joined_name(p) == output}
    missing = sorted((siblings | set(parts)) - chosen)
    absent = sorted(set(parts) - set(by_path))
    if absent:
        raise UsageError(f"{output}: the preset lists parts {', '.join(absent)} that {repo.repo_id}@{repo.revision} "
                         f"does not have; update configs/presets or use --no-join")
    if missing:
        raise UsageError(f"{output}: --include/--exclude leave out parts {', '.join(missing)}; include all parts "
                         f"or pass --no-join")


def _joined_name(path: str) -> str | None:
    """The joined file a part belongs to (same naming rules as ``gptq-tools join``), or None."""
    folder, _, name = path.rpartition("/")
    parsed = parse_part_name(name)
    if parsed is None:
        return None
    return f"{folder}/{parsed.output_name}" if folder else parsed.output_name


def _part_position(path: str) -> tuple[int, int | str]:
    """Sort key of a part: letter suffixes by width then letters (``a``..``z``, ``aa``..), numbers by value."""
    parsed = parse_part_name(path.rpartition("/")[2])
    key = parsed.key if parsed is not None else path
    return (len(key), key) if not key.isdigit() else (0, int(key))


def _expected_hash(output: str, sha256: dict[str, str], preset_files: dict[str, dict[str, Any]],
                   repo: ResolvedRepo) -> tuple[str | None, str]:
    """The hash ``output`` must have and its source, by trust: ``--sha256``, then the preset's pinned hash,
    then the repository's ``SHA256SUMS``. A manifest the repository (or whatever answers at ``HF_ENDPOINT``)
    serves never replaces a pinned hash: :func:`check_pinned_hashes` compares them instead."""
    given = sha256.get(output) or sha256.get("")
    if given:
        return given.lower(), "--sha256"
    published = preset_files.get(output, {}).get("sha256")
    if published:
        return str(published).lower(), f"preset {repo.preset.name}"  # type: ignore[union-attr]
    if any(f.path in MANIFEST_NAMES for f in repo.files):
        return None, "SHA256SUMS"
    return None, "none"


def check_pinned_hashes(plan: DownloadPlan) -> None:
    """Refuse a download whose repository ``SHA256SUMS`` disagrees with a pinned hash (``--sha256`` or a
    preset's): one of them is wrong, and the served one must not win by being newer.

    Raises:
        ChecksumMismatchError: naming the output, both hashes and both sources.
    """
    listed = [f.remote for f in plan.files]
    name = next((f.path for f in listed if f.path in MANIFEST_NAMES), None)
    for join in plan.joins:
        if join.expected_sha256 is None or name is None:
            continue
        served = manifest_hash(join, plan.local_dir, listed)
        if served is not None and served != join.expected_sha256:
            raise ChecksumMismatchError(
                f"{join.output}: {join.source} pins SHA256 {join.expected_sha256} but {name} in "
                f"{plan.repo.repo_id}@{plan.repo.revision} lists {served}; a pinned hash is never overridden by the "
                f"repository. Nothing was joined: check which is right (report it to the preset or repository "
                f"owner), or pass --sha256 NAME=HEX with the hash you trust")


def check_local_kinds(local_dir: Path, paths: list[str]) -> None:
    """Refuse, before anything moves, a folder where the repository has a file, or a file (or link) where
    it needs a folder: the rename at the end would fail after the whole download.

    Raises:
        NotAFileError: a folder sits at a file's name.
        NotAFolderError: a file or a link sits at the name of a folder a file goes into.
    """
    for path in paths:
        target = local_dir / path
        if target.is_dir() and not target.is_symlink():
            raise NotAFileError(f"{target}: is a folder, but the repository has a file {path!r} there; move the "
                                f"folder away or choose another --local-dir")
        for parent in list(Path(path).parents)[:-1]:
            folder = local_dir / parent
            if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
                kind = "a symbolic link" if folder.is_symlink() else "a file"
                raise NotAFolderError(f"{folder}: is {kind}, but the repository needs a folder there for {path!r}; "
                                      f"move it away or choose another --local-dir")


def parse_sha256_options(values: list[str] | None) -> dict[str, str]:
    """``--sha256`` values (``HEX`` or ``NAME=HEX``) as ``{name or "": hex}``.

    Raises:
        UsageError: a value is not 64 hex digits.
    """
    result: dict[str, str] = {}
    for value in values or []:
        name, _, digest = value.rpartition("=")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise UsageError(f"--sha256 {value!r}: expected 64 hex digits, optionally as NAME=HEX")
        result[name] = digest.lower()
    return result


def plan_files(repo: ResolvedRepo, files: list[RemoteFile], joins: list[PlannedJoin], state: LocalState, *,
               force: bool) -> tuple[list[PlannedFile], list[PlannedJoin], list[str]]:
    """Classify every file against the local folder; refuse foreign files unless ``force``.

    Raises:
        OutputExistsError: a file (or joined output) of the same name holds other bytes.
    """
    planned, foreign = [], []
    done_joins = {j.output for j in joins if _join_done(j, state)}
    skip_parts = {p for j in joins if j.output in done_joins for p in j.parts}
    present_paths: set[str] = set()
    for remote in files:
        present = state.check_existing(remote.path, remote.checksum, remote.size)
        if present is False:
            foreign.append(remote.path)
        if present is True or (remote.path in skip_parts and present is None):
            planned.append(PlannedFile(remote, "present", remote.size))
            present_paths.add(remote.path)
            continue
        have = state.partial_bytes(remote.path, remote.checksum, remote.size)
        planned.append(PlannedFile(remote, "partial" if have else "missing", have))
    for join in joins:
        if join.output in done_joins or not (state.local_dir / join.output).exists():
            continue
        if _adopt_joined(join, state, files, present_paths):
            done_joins.add(join.output)
        else:
            foreign.append(join.output)
    if foreign and not force:
        where = f"{repo.repo_id}@{repo.commit[:12]}"
        raise OutputExistsError(
            f"{state.local_dir}: {', '.join(foreign)} already exist(s) there but hold other bytes than {where}; "
            f"move them away, choose another --local-dir, or pass --force to replace them")
    joins = [PlannedJoin(j.output, j.parts, j.size, j.expected_sha256, j.source, j.output in done_joins) for j in joins]
    return planned, joins, foreign


def _join_done(join: PlannedJoin, state: LocalState) -> bool:
    record = state.verified_record(join.output)
    if record is None:
        return False
    if join.expected_sha256 is not None and record.get("hash") != join.expected_sha256:
        return False
    return state.is_verified(join.output, ("sha256", str(record.get("hash"))))


def manifest_hash(join: PlannedJoin, local_dir: Path, files: list[RemoteFile] | tuple[RemoteFile, ...]) -> str | None:
    """The SHA256 that the repository's ``SHA256SUMS`` (already downloaded into ``local_dir``) gives ``join``."""
    from ..files.manifest import parse_manifest

    name = next((f.path for f in files if f.path in MANIFEST_NAMES), None)
    if name is None or not (local_dir / name).is_file():
        return None
    entries = parse_manifest(local_dir / name)
    expected = entries.get(join.output) or entries.get(join.output.rsplit("/", 1)[-1])
    return expected.lower() if expected else None


def _adopt_joined(join: PlannedJoin, state: LocalState, files: list[RemoteFile], present: set[str]) -> bool:
    """Whether an unrecorded file at ``join.output`` is this join's result (a run killed right after the
    join renamed it, before it was recorded); if so it is recorded as verified.

    Its SHA256 is compared with the published one, or, without one, with that of the verified parts.
    """
    expected = join.expected_sha256
    if expected is None and join.source == "SHA256SUMS":
        if not any(f.path in MANIFEST_NAMES and f.path in present for f in files):
            return False
        expected = manifest_hash(join, state.local_dir, files)
    if expected is None:
        if not set(join.parts) <= present:
            return False
        hasher = WholeHasher()
        run_pipeline(file_segments([state.local_dir / p for p in join.parts]), [hasher])
        expected = hasher.hexdigest()
    output = state.local_dir / join.output
    logger.info("%s: already there but not recorded; checking its sha256 before trusting it", output)
    if not output.is_file() or sha256_file(output) != expected:
        return False
    state.mark_verified(join.output, ("sha256", expected))
    return True


def _existing_ancestor(folder: Path) -> Path:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_space(folder: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) ``folder``."""
    return shutil.disk_usage(_existing_ancestor(folder)).free


def check_fits(plan: DownloadPlan) -> None:
    """Raise :class:`InsufficientSpaceError` when the download plus the joins cannot fit.

    Raises:
        OutputNotWritableError: the folder would be on a filesystem that stores no files (``/proc``, ``/sys``:
            zero blocks in all), where "0 B free" would misstate the problem.
    """
    if plan.fits:
        return
    probe = _existing_ancestor(plan.local_dir)
    if hasattr(os, "statvfs") and os.statvfs(probe).f_blocks == 0:
        raise OutputNotWritableError(
            f"{plan.local_dir}: {probe} is a virtual filesystem (no storage at all, like /proc or /sys) and "
            f"cannot hold downloaded files; choose another --local-dir")
    raise InsufficientSpaceError(
        f"{plan.local_dir}: needs {format_size(plan.download_bytes)} to download"
        f"{f' + {format_size(plan.join_bytes)} to join' if plan.join_bytes else ''} but only "
        f"{format_size(plan.free_bytes)} is free; free some space, choose another --local-dir, narrow the "
        f"files with --include, or pass --no-space-check to try anyway")
