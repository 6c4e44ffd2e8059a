"""``gptq-tools publish FOLDER REPO[:BRANCH]``: put a model folder on the Hub as a repository branch that
``download`` and ``verify --remote`` can check, every file under the Hub's per-file limit.

Three steps. **Plan**: list the folder's files (hidden files, temporaries and its old ``SHA256SUMS`` are
left out; a symbolic link is refused, so nothing outside the folder can leak), and decide, for each file
larger than ``max_file_size``, whether it is resharded (the folder's one safetensors weights file, no
index: valid shards plus ``model.safetensors.index.json``, which every loader reads without a join step)
or split into ``NAME.JOINBEFOREUSE.split-a.EXT`` byte parts (anything else, or ``oversize="split"``: the
original bytes, hence its published SHA256, survive the trip). **Stage**: parts, shards, ``SHA256SUMS``
and the ``README.md`` model card are written atomically into a staging folder beside the model folder
(``FOLDER.publish``); the model folder itself is only read. **Upload**: one commit through huggingface_hub's
``create_commit`` (the repository and branch are created when missing), the files taken from where they
lie, with the SHA256 already computed so nothing is hashed twice. huggingface_hub sends the bytes through
Xet when ``hf_xet`` is installed (chunks already on the Hub are skipped) or the LFS batch API otherwise
(objects already uploaded get no upload action); either way an interrupted publish, run again, sends only
what is missing. Files that an earlier publish put on the branch (named in its ``SHA256SUMS``) and that this
one no longer has are deleted in the same commit, so a republish leaves no stale parts behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..checkpoint.eval_results import read_eval_results
from ..checkpoint.model_files import INDEX_SUFFIX, read_json, read_quantize_config
from ..checkpoint.presets import REPO_ID_RE
from ..errors import HubAuthError, HubError, RepoNotFoundError, UnsafePathError, UsageError
from ..files.fileio import TEMP_PREFIX, work_lock, write_bytes_atomic
from ..files.manifest import format_manifest_line, parse_manifest, parse_manifest_text
from ..files.names import validate_relative_name
from ..files.parts import parse_part_name
from ..files.paths import require_folder
from ..files.pipeline import sha256_file
from ..files.safetensors_format import read_header
from ..files.split import (
    INDEX_NAME,
    MANIFEST_NAME,
    PlannedOutput,
    largest_shard_overhead,
    plan_reshard,
    plan_split,
    reshard_file,
    split_file,
)
from ..progress import byte_bar, progress_enabled
from ..units import format_size, parse_size
from .card import CardFile, CardInputs, CardJoin, CardReshard, render_card
from .remote import LOGIN_HINT, METADATA_TIMEOUTS, _request_url, bounded_session

logger = logging.getLogger(__name__)

DEFAULT_MAX_FILE_SIZE = "50GB"
OVERSIZE_CHOICES = ("reshard", "split")
CARD_NAME = "README.md"
#: Branch names publish accepts: git's rules, kept to plain characters (no ``..``, no leading ``-`` or ``/``).
_BRANCH_RE = re.compile(r"^(?![-/.])(?!.*\.\.)(?!.*//)(?!.*\.lock$)[A-Za-z0-9._/-]{1,100}(?<![/.])$")
#: File names publish uploads: the characters every shell, Hub URL and sha256sum line take as they are.
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*(/[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@,-]*)*$")
#: Names in the folder that are never uploaded: publish writes its own, or they are scratch files.
_SKIPPED_SUFFIXES = (".incomplete", ".partial", ".lock")
#: A remote SHA256SUMS larger than this is not one publish wrote.
_MAX_REMOTE_SUMS = 1 << 20


@dataclass(frozen=True)
class PublishedFile:
    """One file of the commit: its path in the repository, where its bytes are read from, size, SHA256."""

    path_in_repo: str
    local: Path
    size: int
    sha256: str
    origin: str  # "folder", "part of NAME", "shard of NAME", "index of NAME" or "generated"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path_in_repo, "local": str(self.local), "size": self.size, "sha256": self.sha256,
                "origin": self.origin}


@dataclass(frozen=True)
class PublishPlan:
    """What a publish sends (and, after a dry run, would send)."""

    folder: Path
    repo_id: str
    revision: str
    staging: Path
    max_file_size: int
    files: tuple[PublishedFile, ...]
    joins: tuple[CardJoin, ...] = ()
    reshards: tuple[CardReshard, ...] = ()
    card: str = "generated"  # "generated", or "kept" (the folder's own README.md is uploaded as it is)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "repo_id": self.repo_id, "revision": self.revision,
                "staging": str(self.staging), "max_file_size": self.max_file_size, "card": self.card,
                "files": [f.to_dict() for f in self.files], "total_bytes": self.total_bytes,
                "joins": [{"output": j.output, "parts": list(j.parts), "sha256": j.sha256} for j in self.joins],
                "reshards": [{"source": r.source, "sha256": r.sha256, "shards": list(r.shards), "index": r.index}
                             for r in self.reshards]}


@dataclass(frozen=True)
class PublishResult:
    """The plan, and for a real run the commit that holds it."""

    plan: PublishPlan
    dry_run: bool
    commit: str | None = None
    commit_url: str | None = None
    endpoint: str | None = None
    deleted: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "dry_run": self.dry_run, "commit": self.commit,
                "commit_url": self.commit_url, "endpoint": self.endpoint, "deleted": list(self.deleted)}


def parse_publish_target(repo: str, revision: str | None = None) -> tuple[str, str]:
    """``NAMESPACE/NAME[:BRANCH]`` (plus ``--revision``) as (repository id, branch; default ``main``).

    Raises:
        UsageError: not a NAMESPACE/NAME repository id, an unusable branch name, or two different branches.
    """
    name, _, branch = repo.strip().partition(":")
    if "/" not in name or not REPO_ID_RE.match(name) or ".." in name or repo.count(":") > 1:
        raise UsageError(f"{repo!r} is not a repository to publish to; write it as NAMESPACE/NAME[:BRANCH] "
                         f"(e.g. me/opt-iml-30b-gptq:4bit-128g)")
    if branch and revision and branch != revision:
        raise UsageError(f"{repo!r} names branch {branch!r} but --revision is {revision!r}; give only one")
    chosen = branch or revision or "main"
    if not _BRANCH_RE.match(chosen):
        raise UsageError(f"{chosen!r} is not a branch name publish uses; use letters, digits, '.', '_', '-' "
                         f"and '/' (e.g. 4bit-128g)")
    return name, chosen


def publish(folder: str | os.PathLike[str], repo: str, *, revision: str | None = None,
            max_file_size: int | str = DEFAULT_MAX_FILE_SIZE, oversize: str = "reshard",
            staging_dir: str | os.PathLike[str] | None = None, overwrite_card: bool = False,
            message: str | None = None, token: str | None = None, endpoint: str | None = None,
            dry_run: bool = False, progress: bool | None = None) -> PublishResult:
    """Publish the model in ``folder`` to ``repo`` (``NAMESPACE/NAME[:BRANCH]``).

    Args:
        folder: a GPTQ checkpoint or any folder with safetensors weights; it is only read.
        repo: the repository, optionally ``:BRANCH`` (created when missing).
        revision: the branch, instead of ``:BRANCH``.
        max_file_size: the largest file to upload (the Hub takes at most 50 GB per file).
        oversize: ``"reshard"`` (default: a single safetensors weights file becomes valid shards and an
            index) or ``"split"`` (byte parts with ``JOINBEFOREUSE`` names). Files that cannot be resharded
            are split either way.
        staging_dir: where parts, shards, ``SHA256SUMS`` and the card are written (default ``FOLDER.publish``
            beside the folder); kept afterwards, so a rerun reuses what it holds.
        overwrite_card: replace the folder's own ``README.md`` with the generated card (default: keep it).
        message: the commit message.
        token: Hub token; None lets huggingface_hub find one (``HF_TOKEN``, ``hf auth login``).
        endpoint: Hub base URL; default huggingface_hub's (``HF_ENDPOINT``).
        dry_run: plan and hash only: nothing is written or sent.

    Returns:
        The plan, and for a real run the commit.

    Raises:
        UsageError: a bad repository or branch, nothing to publish, a file that cannot be made small enough.
        UnsafePathError: a symbolic link in the folder, or a staging folder inside it.
        CheckpointError, SafetensorsFormatError: a config or weights file that cannot be read.
        HubAuthError, RepoNotFoundError, HubError: the Hub refused or could not be reached (one line naming it).
    """
    repo_id, branch = parse_publish_target(repo, revision)
    root = require_folder(folder, what="the model folder to publish")
    limit = _file_size_cap(max_file_size)
    if oversize not in OVERSIZE_CHOICES:
        raise UsageError(f"--oversize {oversize!r}: use reshard or split")
    staging = _staging_folder(root, staging_dir)
    sources = _without_parts_of_present_files(_source_files(root))
    _check_publishable(root, sources)
    if dry_run:
        return PublishResult(_plan(root, repo_id, branch, sources, staging, limit, oversize, overwrite_card,
                                   write=False, progress=progress), dry_run=True)
    staging.mkdir(parents=True, exist_ok=True)
    with work_lock(staging / f"{TEMP_PREFIX}publish.lock", what=f"publish staging in {staging}"):
        plan = _plan(root, repo_id, branch, sources, staging, limit, oversize, overwrite_card, write=True,
                     progress=progress)
        return _upload(plan, message=message, token=token, endpoint=endpoint,
                       progress=progress_enabled() if progress is None else progress)


# ------------------------------------------------------------------------------------------ the plan
def _file_size_cap(max_file_size: int | str) -> int:
    limit = parse_size(max_file_size, what="--max-file-size")
    if limit <= 0:
        raise UsageError("--max-file-size must be positive (the Hub takes files of up to 50GB)")
    bare = isinstance(max_file_size, int) or max_file_size.strip().isdigit()
    if bare and limit < 2**20:
        logger.warning("--max-file-size: %d B is below 1 MiB: a bare number is bytes; write the unit, e.g. 50GB "
                       "or 45GiB", limit)
    return limit


def _staging_folder(root: Path, staging_dir: str | os.PathLike[str] | None) -> Path:
    staging = Path(staging_dir) if staging_dir is not None else root.parent / f"{root.name}.publish"
    resolved, folder = staging.resolve(), root.resolve()
    if resolved == folder or folder in resolved.parents or resolved in folder.parents:
        raise UnsafePathError(f"{staging}: the staging folder must be outside the model folder {root} (and not "
                              f"hold it); publish never writes into the folder it publishes. Give another "
                              f"--staging-dir")
    return staging


def _source_files(root: Path) -> list[tuple[str, Path, int]]:
    """(name in the repository, path, size) of every file to publish from ``root``, sorted by name."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in list(dirnames):
            if (here / name).is_symlink():
                _refuse_link(here / name)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = here / name
            relative = path.relative_to(root).as_posix()
            if name.startswith(".") or name.startswith(TEMP_PREFIX) or name.endswith(_SKIPPED_SUFFIXES) \
                    or relative == MANIFEST_NAME:
                continue
            if path.is_symlink():
                _refuse_link(path)
            validate_relative_name(relative, what=f"{root}: file")
            if not _FILE_NAME_RE.match(relative):
                raise UsageError(f"{path}: the name has characters publish does not upload (only letters, digits "
                                 f"and . _ - + = @ ,); rename the file or move it out of the folder")
            found.append((relative, path, path.stat().st_size))
    return sorted(found)


def _without_parts_of_present_files(sources: list[tuple[str, Path, int]]) -> list[tuple[str, Path, int]]:
    """Drop the parts of a file that is in the folder too (what ``download`` keeps beside a joined file unless
    ``--delete-parts``): the whole file is published, split again only if it is over the cap."""
    names = {name for name, _, _ in sources}
    kept = []
    for name, path, size in sources:
        part = parse_part_name(Path(name).name)
        whole = part and (Path(name).parent / part.output_name).as_posix().removeprefix("./")
        if whole in names:
            logger.info("%s: skipped, a part of %s, which is published whole", name, whole)
            continue
        kept.append((name, path, size))
    return kept


def _refuse_link(path: Path) -> None:
    raise UnsafePathError(f"{path} is a symbolic link; publish uploads only the folder's own files (a link could "
                          f"send a file from elsewhere): replace it with the file itself, or remove it")


def _check_publishable(root: Path, sources: list[tuple[str, Path, int]]) -> None:
    """Refuse a folder with no safetensors weights; read every safetensors header (a broken one is named)."""
    weights = [(name, path) for name, path, _ in sources if name.endswith(".safetensors")]
    if not weights:
        what = ", ".join(name for name, _, _ in sources[:5]) or "no files"
        raise UsageError(f"{root}: nothing to publish: no *.safetensors weights ({what}); give the folder that "
                         f"`gptq-tools quantize` or `download` wrote")
    for name, path in weights:
        if parse_part_name(Path(name).name) is None:
            read_header(path)


def _plan(root: Path, repo_id: str, branch: str, sources: list[tuple[str, Path, int]], staging: Path, limit: int,
          oversize: str, overwrite_card: bool, *, write: bool, progress: bool | None) -> PublishPlan:
    files: list[PublishedFile] = []
    joins: list[CardJoin] = []
    reshards: list[CardReshard] = []
    reshardable = _reshardable(sources) if oversize == "reshard" else None
    kept_card = any(name == CARD_NAME for name, _, _ in sources) and not overwrite_card
    for name, path, size in sources:
        if name == CARD_NAME and not kept_card:
            continue
        if size <= limit:
            files.append(PublishedFile(name, path, size, _hash(path, size, progress), "folder"))
        elif name == reshardable:
            reshards.append(_reshard(path, staging, limit, files, write=write, progress=progress))
        else:
            joins.append(_split(name, path, staging, limit, files, write=write, progress=progress))
    _check_no_clash(files)
    card_bytes = None
    if not kept_card:
        card_bytes = _card(root, repo_id, branch, files, joins, reshards).encode()
        files.append(_generated(CARD_NAME, card_bytes, staging))
    elif joins or reshards:
        logger.warning("%s: your README.md is uploaded as it is, without the join/verify instructions of the "
                       "generated card; pass --overwrite-card to replace it", root)
    sums = "".join(format_manifest_line(name, digest) + "\n"
                   for name, digest in sorted({**{f.path_in_repo: f.sha256 for f in files},
                                               **{j.output: j.sha256 for j in joins}}.items())).encode()
    files.append(_generated(MANIFEST_NAME, sums, staging))
    if write:
        for name, data in ((CARD_NAME, card_bytes), (MANIFEST_NAME, sums)):
            if data is not None:
                write_bytes_atomic(staging / name, data)
    return PublishPlan(root, repo_id, branch, staging, limit, tuple(sorted(files, key=lambda f: f.path_in_repo)),
                       tuple(joins), tuple(reshards), "kept" if kept_card else "generated")


def _hash(path: Path, size: int, progress: bool | None) -> str:
    with byte_bar(size, f"hash {path.name}", enabled=progress if size > 1 << 26 else False) as bar:
        return sha256_file(path, on_bytes=bar.update)


def _generated(name: str, data: bytes, staging: Path) -> PublishedFile:
    return PublishedFile(name, staging / name, len(data), hashlib.sha256(data).hexdigest(), "generated")


def _reshardable(sources: list[tuple[str, Path, int]]) -> str | None:
    """The file a reshard applies to: the folder's one top-level safetensors weights file, with no index."""
    if any(name.endswith(INDEX_SUFFIX) for name, _, _ in sources):
        return None
    plain = [name for name, _, _ in sources if name.endswith(".safetensors") and "/" not in name
             and parse_part_name(name) is None]
    return plain[0] if len(plain) == 1 else None


def _reshard(path: Path, staging: Path, limit: int, files: list[PublishedFile], *, write: bool,
             progress: bool | None) -> CardReshard:
    largest, header_bound = largest_shard_overhead(path)
    budget = limit - header_bound
    if budget <= 0 or largest > budget:
        raise UsageError(f"{path}: a tensor of {format_size(largest)} (plus its header) cannot fit a shard under "
                         f"--max-file-size {format_size(limit)}; use --oversize split (byte parts) or a larger "
                         f"--max-file-size")
    if write:
        result = reshard_file(path, staging, max_shard_size=budget, progress=progress)
        digests = parse_manifest(result.manifest)
        outputs = [PlannedOutput(s.name, s.stat().st_size, digests[s.name]) for s in result.shards]
        index_bytes = result.index.read_bytes()
        source_sha = sha256_file(path)
    else:
        outputs, index_bytes = plan_reshard(path, max_shard_size=budget, progress=progress)
        source_sha = sha256_file(path)
    for output in outputs:
        _check_fits(output, limit)
        files.append(PublishedFile(output.name, staging / output.name, output.size, output.sha256,
                                   f"shard of {path.name}"))
    files.append(PublishedFile(INDEX_NAME, staging / INDEX_NAME, len(index_bytes),
                               hashlib.sha256(index_bytes).hexdigest(), f"index of {path.name}"))
    logger.info("%s: %s, over --max-file-size, is published as %d shards with %s", path, format_size(
        path.stat().st_size), len(outputs), INDEX_NAME)
    return CardReshard(path.name, source_sha, tuple(o.name for o in outputs), INDEX_NAME)


def _split(name: str, path: Path, staging: Path, limit: int, files: list[PublishedFile], *, write: bool,
           progress: bool | None) -> CardJoin:
    folder = staging / Path(name).parent
    if write:
        result = split_file(path, max_size=limit, output_dir=folder, progress=progress)
        outputs = [PlannedOutput(p.name, p.stat().st_size, result.part_sha256[p.name]) for p in result.parts]
        whole = result.sha256
    else:
        outputs, whole = plan_split(path, max_size=limit, progress=progress)
    prefix = "" if "/" not in name else name.rsplit("/", 1)[0] + "/"
    for output in outputs:
        _check_fits(output, limit)
        files.append(PublishedFile(prefix + output.name, folder / output.name, output.size, output.sha256,
                                   f"part of {name}"))
    logger.info("%s: %s, over --max-file-size, is published as %d byte parts", path,
                format_size(path.stat().st_size), len(outputs))
    return CardJoin(name, tuple(prefix + o.name for o in outputs), whole)


def _check_fits(output: PlannedOutput, limit: int) -> None:
    if output.size > limit:  # the planners promise otherwise; a broken promise must not reach the Hub
        raise UsageError(f"{output.name}: {output.size} bytes is over --max-file-size {limit}; nothing was sent")


def _check_no_clash(files: list[PublishedFile]) -> None:
    seen: dict[str, str] = {}
    for item in files:
        if item.path_in_repo in seen:
            raise UsageError(f"{item.path_in_repo}: the folder already has a file of that name, and publish would "
                             f"also upload one as {item.origin}; rename or remove the folder's file")
        seen[item.path_in_repo] = item.origin


def _card(root: Path, repo_id: str, branch: str, files: list[PublishedFile], joins: list[CardJoin],
          reshards: list[CardReshard]) -> str:
    config = read_json(root / "config.json") if (root / "config.json").is_file() else {}
    quantize_config: dict[str, Any] | None = None
    source = None
    if (root / "quantize_config.json").is_file() or isinstance(config.get("quantization_config"), dict):
        quantize_config, where = read_quantize_config(root)  # a damaged file is an error naming it
        source = "config.json quantization_config" if where.endswith("quantization_config") else \
            "quantize_config.json"
    else:
        logger.warning("%s: no quantize_config.json and no quantization_config in config.json: publishing it as "
                       "a plain safetensors model (the card says so)", root)
    listed = tuple(CardFile(f.path_in_repo, f.size, f.sha256) for f in sorted(files, key=lambda f: f.path_in_repo))
    title = f"{repo_id.rsplit('/', 1)[1]}" + (f" ({branch})" if branch != "main" else "")
    return render_card(CardInputs(repo_id, branch, title, config, quantize_config, source, listed, tuple(joins),
                                  tuple(reshards), tuple(read_eval_results(root))))


# ---------------------------------------------------------------------------------------- the upload
def _upload(plan: PublishPlan, *, message: str | None, token: str | None, endpoint: str | None,
            progress: bool) -> PublishResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    base = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=base, token=token)
    where = f"{plan.repo_id}:{plan.revision}"
    with upload_errors(where, base), _hub_progress_bars(progress):
        with bounded_session(METADATA_TIMEOUTS):
            api.create_repo(plan.repo_id, exist_ok=True)
            if plan.revision != "main":
                api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
            stale = _stale_files(api, plan, base, token)
        operations: list[Any] = []
        for item in plan.files:
            operation = CommitOperationAdd(path_in_repo=item.path_in_repo, path_or_fileobj=str(item.local))
            operation.upload_info.sha256 = bytes.fromhex(item.sha256)  # hashed once, while planning
            operations.append(operation)
        operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
        info = api.create_commit(plan.repo_id, operations=operations, revision=plan.revision,
                                 commit_message=message or f"Publish {plan.folder.name} with gptq-tools")
    logger.info("%s: commit %s (%d files, %s)", where, info.oid, len(plan.files), format_size(plan.total_bytes))
    return PublishResult(plan, dry_run=False, commit=info.oid, commit_url=info.commit_url, endpoint=base,
                         deleted=tuple(stale))


def _stale_files(api: Any, plan: PublishPlan, base: str, token: str | None) -> list[str]:
    """Files the branch holds because an earlier publish listed them in its ``SHA256SUMS``, and that this
    publish does not send: deleted in the same commit. Files publish never wrote are left alone."""
    from huggingface_hub.utils import build_hf_headers, get_session

    remote = set(api.list_repo_files(plan.repo_id, revision=plan.revision))
    if MANIFEST_NAME not in remote:
        return []
    url = f"{base}/{plan.repo_id}/resolve/{quote(plan.revision, safe='')}/{MANIFEST_NAME}"
    response = get_session().get(url, headers=build_hf_headers(token=token), follow_redirects=True)
    response.raise_for_status()
    if len(response.content) > _MAX_REMOTE_SUMS:
        logger.warning("%s: the branch's SHA256SUMS is %d bytes, not one publish wrote: no file is deleted", url,
                       len(response.content))
        return []
    try:
        listed = parse_manifest_text(response.content.decode("utf-8"), source=url)
    except (UnicodeDecodeError, ValueError) as exc:
        logger.warning("%s: cannot read the branch's SHA256SUMS (%s): no file is deleted", url, exc)
        return []
    sending = {f.path_in_repo for f in plan.files}
    return sorted({entry.name for entry in listed} & remote - sending - {".gitattributes"})


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's upload bars follow gptq-tools' (``--no-progress``, no terminal): off for the block when
    ours are off, then put back as they were."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()


@contextlib.contextmanager
def upload_errors(where: str, endpoint: str) -> Iterator[None]:
    """huggingface_hub's, httpx's and hf_xet's errors during a publish as one line naming the endpoint."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except hf_errors.RepositoryNotFoundError as exc:
        raise RepoNotFoundError(f"{where}: {endpoint} has no such repository, or it is not yours (HTTP "
                                f"{_status(exc)}); check the name, and {LOGIN_HINT} with a write token") from None
    except hf_errors.HfHubHTTPError as exc:
        status = _status(exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if status in (401, 403):
            raise HubAuthError(f"{where}: {endpoint} refused the upload (HTTP {status}: {first}); a token with write "
                               f"access is needed: pass --token, set HF_TOKEN, or `hf auth login`") from None
        raise HubError(f"{where}: {endpoint} answered HTTP {status} ({first}); nothing more was sent, run "
                       f"publish again to resume") from None
    except (httpx2.TransportError, httpx2.TimeoutException) as exc:
        raise HubError(f"{where}: cannot reach {endpoint} ({type(exc).__name__} at {_request_url(exc)}: {exc}); "
                       f"check the network and HF_ENDPOINT, then run publish again to resume") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:  # hf_xet, LFS transfer and response-shape errors
        cause = exc.__cause__ or exc
        text = " ".join(str(cause).split()) or type(cause).__name__
        hint = (" (the server does not take Xet uploads: set HF_HUB_DISABLE_XET=1 to upload through LFS)"
                if "xet" in text.lower() else "")
        raise HubError(f"{where}: upload to {endpoint} failed: {text}{hint}; run publish again to resume") from None


def _status(exc: Exception) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def describe(plan: PublishPlan) -> list[str]:
    """The dry-run listing: one line per file (path, size, SHA256, where it comes from), then the totals."""
    lines = [f"{plan.folder} -> {plan.repo_id}@{plan.revision} (every file <= {format_size(plan.max_file_size)}; "
             f"staging {plan.staging})"]
    for item in plan.files:
        lines.append(f"  {format_size(item.size):>10}  {item.sha256}  {item.path_in_repo}  ({item.origin})")
    for join in plan.joins:
        lines.append(f"  joined: {join.sha256}  {join.output} <- {len(join.parts)} parts")
    lines.append(f"to send: {len(plan.files)} files, {format_size(plan.total_bytes)}; card: "
                 f"{'generated README.md' if plan.card == 'generated' else 'the folder README.md, as it is'}")
    return lines

