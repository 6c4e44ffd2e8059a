"""``download``: from ``REPO[:BRANCH]`` to a verified, joined, ready-to-load folder."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import HubError, NotAFolderError, UsageError
from ..files.fileio import unlink, work_lock
from ..progress import byte_bar
from .plan import (
    MANIFEST_NAMES,
    DownloadPlan,
    PlannedFile,
    PlannedJoin,
    check_fits,
    check_local_kinds,
    check_pinned_hashes,
    find_joins,
    free_space,
    manifest_hash,
    parse_sha256_options,
    plan_files,
    select_files,
)
from .remote import ResolvedRepo, listing_of, offline_repo, parse_spec, resolve_repo
from .state import LocalState
from .sums import write_download_sums
from .transfer import FileTask, TransferOptions, fetch_files

logger = logging.getLogger(__name__)

#: The lock file in the state folder: one download at a time per folder (see :func:`work_lock`).
LOCK_NAME = "lock"


@dataclass(frozen=True)
class JoinedFile:
    """A joined output: its SHA256, and whether it matched a published hash (and which)."""

    output: str
    sha256: str
    verified: bool
    expected_from: str


@dataclass(frozen=True)
class DownloadResult:
    """What :func:`download` did."""

    plan: DownloadPlan
    downloaded: tuple[str, ...]
    joined: tuple[JoinedFile, ...]
    bytes_downloaded: int
    seconds: float
    dry_run: bool = False
    sums: str | None = None  # the SHA256SUMS the download wrote (None: the repository ships one, or dry run)

    @property
    def already_complete(self) -> bool:
        """Whether the folder already held every file (and joined file), verified: nothing was done."""
        return not self.dry_run and not self.downloaded and not self.joined

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``--json``): with ``dry_run`` the plan, otherwise the folder after the work."""
        data = self.plan.to_dict()
        if not self.dry_run:
            data = _after_the_work(data, self.plan.local_dir, {j.output for j in self.joined})
        return {**data, "dry_run": self.dry_run, "already_complete": self.already_complete,
                "downloaded": list(self.downloaded), "joined": [vars(j) for j in self.joined],
                "bytes_downloaded": self.bytes_downloaded, "seconds": round(self.seconds, 3), "sha256sums": self.sums}


def _after_the_work(data: dict[str, Any], local_dir: Path, joined: set[str]) -> dict[str, Any]:
    """The plan's statuses replaced by what the folder holds now: ``present`` (verified, all bytes) or
    ``deleted`` (a part removed after its verified join); joins ``done``."""
    files = [{**item, "status": "present", "have_bytes": item["size"]} if (local_dir / item["path"]).is_file()
             else {**item, "status": "deleted", "have_bytes": 0} for item in data["files"]]
    joins = [{**join, "done": join["done"] or join["output"] in joined} for join in data["joins"]]
    return {**data, "files": files, "joins": joins, "download_bytes": 0, "join_bytes": 0}


def plan_download(spec: str, *, local_dir: str | Path, revision: str | None = None,
                  include: list[str] | None = None, exclude: list[str] | None = None, join: bool = True,
                  sha256: list[str] | None = None, force: bool = False, endpoint: str | None = None,
                  token: str | bool | None = None, timeouts: tuple[float, float] | None = None) -> DownloadPlan:
    """Resolve ``spec`` and compute what a download into ``local_dir`` would fetch and join.

    Args:
        spec: ``NAMESPACE/NAME[:BRANCH]`` or a preset name (``bloomz-176b-gptq[:BRANCH]``).
        local_dir: destination folder.
        revision: branch, tag or commit (instead of ``:BRANCH``).
        include: globs of files to fetch (default all).
        exclude: globs of files to skip.
        join: plan joining split parts.
        sha256: expected hashes of joined files, ``HEX`` or ``NAME=HEX``.
        force: replace local files of the same names that hold other bytes.
        endpoint: Hub URL (default ``HF_ENDPOINT``).
        token: Hub token (default: the one huggingface_hub finds).
        timeouts: (connect, read) seconds per metadata request (default
            :data:`gptq_tools.hub.remote.METADATA_TIMEOUTS`).

    Returns:
        The plan (nothing is transferred).

    Raises:
        UsageError: bad spec, no file matches, incomplete part set.
        RepoNotFoundError, RevisionNotFoundError, HubAuthError, HubError: the Hub said no.
        OutputExistsError: foreign files in ``local_dir`` and not ``force``.
    """
    from huggingface_hub import constants

    repo_spec = parse_spec(spec, revision=revision)
    local = Path(local_dir).expanduser().resolve()
    if local.exists() and not local.is_dir():
        raise NotAFolderError(f"{local}: --local-dir is an existing file, not a folder; give a folder (it is "
                              f"created if missing)")
    state = LocalState(local)
    state.migrate()
    if constants.is_offline_mode():
        repo = offline_repo(repo_spec, state.load_listing(repo_spec.revision), where=str(local))
    else:
        repo = resolve_repo(repo_spec, endpoint=endpoint, token=token, timeouts=timeouts)
    files = select_files(repo, include, exclude)
    check_local_kinds(local, [f.path for f in files])
    hashes = parse_sha256_options(sha256)
    joins = find_joins(repo, files, sha256=hashes) if join else []
    if not join and hashes:
        raise UsageError("--sha256 checks joined files; it cannot be used with --no-join")
    if joins:  # a served manifest either gives the joined hash or is checked against the pinned one
        chosen = {f.path for f in files}
        files += [f for f in repo.files if f.path in MANIFEST_NAMES and f.path not in chosen]
    planned, joins, foreign = plan_files(repo, files, joins, state, force=force)
    download_bytes = sum(f.remote.size - f.have_bytes for f in planned if f.status != "present")
    join_bytes = sum(j.size for j in joins if not j.done)
    return DownloadPlan(repo=repo, local_dir=local, files=tuple(planned), joins=tuple(joins),
                        download_bytes=download_bytes, join_bytes=join_bytes, free_bytes=free_space(local),
                        replaced=tuple(foreign))


def download(spec: str, *, local_dir: str | Path, revision: str | None = None, include: list[str] | None = None,
             exclude: list[str] | None = None, max_workers: int = 8, join: bool = True,
             sha256: list[str] | None = None, force: bool = False, delete_parts: bool = False,
             check_space: bool = True, dry_run: bool = False, endpoint: str | None = None,
             token: str | bool | None = None, options: TransferOptions | None = None,
             wait_lock: float = 0.0) -> DownloadResult:
    """Download a repository branch into ``local_dir``: every file verified, split parts joined on arrival.

    Args:
        spec, local_dir, revision, include, exclude, join, sha256, force, endpoint, token: see
            :func:`plan_download`.
        max_workers: parallel connections (ignored when ``options`` is given).
        delete_parts: remove split parts once their joined file is verified.
        check_space: refuse to start when download plus join cannot fit on the disk.
        dry_run: plan only.
        options: transfer tuning (chunk size, retries, timeouts).
        wait_lock: seconds to wait for another run downloading into ``local_dir`` to finish (0: refuse at
            once; ``math.inf``: without limit); what it fetched is then planned again, not fetched twice.

    Returns:
        What was downloaded and joined.

    Raises:
        Everything :func:`plan_download` raises, and InsufficientSpaceError, ChecksumMismatchError,
        IncompleteDownloadError (run again to resume), HubError.
    """
    if max_workers < 1:
        raise UsageError(f"--max-workers must be at least 1, got {max_workers}")
    started = time.monotonic()
    timeouts = (options.connect_timeout, options.stall_timeout) if options is not None else None
    if wait_lock < 0:
        raise UsageError(f"--wait-lock must be 0 seconds or more, got {wait_lock:g}")

    def make_plan() -> DownloadPlan:
        return plan_download(spec, local_dir=local_dir, revision=revision, include=include, exclude=exclude,
                             join=join, sha256=sha256, force=force, endpoint=endpoint, token=token, timeouts=timeouts)

    plan = make_plan()
    if dry_run:
        return DownloadResult(plan, (), (), 0, time.monotonic() - started, dry_run=True)
    todo = [f for f in plan.files if f.status != "present"]
    _check_can_start(plan, todo, check_space=check_space, delete_parts=delete_parts)
    options = options or TransferOptions(max_workers=max_workers)
    plan.local_dir.mkdir(parents=True, exist_ok=True)
    state = LocalState(plan.local_dir)
    state.prepare()  # the .gitignore is there before the first partial file
    with work_lock(state.folder / LOCK_NAME, what=f"download into {plan.local_dir}",
                   wait_seconds=wait_lock) as waited:
        if waited:  # the run we waited for fetched files this plan counts as missing
            plan = make_plan()
            todo = [f for f in plan.files if f.status != "present"]
            _check_can_start(plan, todo, check_space=check_space, delete_parts=delete_parts)
        return _transfer(plan, state, todo, options=options, token=token, force=force, delete_parts=delete_parts,
                         started=started)


def _transfer(plan: DownloadPlan, state: LocalState, todo: list[PlannedFile], *, options: TransferOptions,
              token: str | bool | None, force: bool, delete_parts: bool, started: float) -> DownloadResult:
    """Fetch, verify and join what ``plan`` needs (the caller holds the folder's lock)."""
    joiner = _Joiner(plan, state, delete_parts=delete_parts, force=force)
    manifests = [f for f in todo if f.remote.path in MANIFEST_NAMES]
    rest = [f for f in todo if f.remote.path not in MANIFEST_NAMES]
    headers = _headers(token)
    try:
        with byte_bar(sum(f.remote.size for f in todo), desc=plan.repo.repo_id) as bar:
            for group in (manifests, rest):
                if group:
                    tasks = [_task(plan.repo, state, f) for f in group]
                    fetch_files(tasks, headers=headers, options=options, bar=bar, on_verified=joiner.file_verified)
                if group is manifests:
                    check_pinned_hashes(plan)  # before the parts: a disagreement is known before 100 GB move
    except BaseException:
        joiner.close()
        raise
    joined = joiner.wait()
    if delete_parts:
        listed = [f.remote for f in plan.files]
        for join in plan.joins:
            if join.done:  # joined by an earlier run, perhaps killed while it deleted the parts
                expected = join.expected_sha256
                if expected is None and join.source == "SHA256SUMS":
                    expected = manifest_hash(join, plan.local_dir, listed)
                _delete_joined_parts(state, join, expected)
    state.save_listing(plan.repo.revision, listing_of(plan.repo))
    state.remove_incomplete()
    sums = write_download_sums(plan, state)
    return DownloadResult(plan, tuple(f.remote.path for f in todo), tuple(joined),
                          sum(f.remote.size - f.have_bytes for f in todo), time.monotonic() - started,
                          sums=None if sums is None else str(sums))


_NO_HASH_TO_DELETE = ("--delete-parts needs a published SHA256 of {output} (give --sha256 NAME=HEX): parts are only "
                      "deleted after the joined file is verified")


def _delete_joined_parts(state: LocalState, join: PlannedJoin, expected: str | None) -> None:
    """Remove ``join``'s parts, once its output is recorded as holding the published hash ``expected``.

    Raises:
        UsageError: no published hash is known, or the output on disk is not recorded with it.
    """
    if expected is None or not state.is_verified(join.output, ("sha256", expected)):
        raise UsageError(_NO_HASH_TO_DELETE.format(output=join.output))
    for part in join.parts:
        path = state.local_dir / part
        if path.exists():
            unlink(path, missing_ok=True)
            logger.info("deleted %s (the joined file was verified)", path)


def _check_can_start(plan: DownloadPlan, todo: list[PlannedFile], *, check_space: bool, delete_parts: bool) -> None:
    """Refuse a download that cannot fit, cannot delete parts safely, or would need the Hub while offline."""
    from huggingface_hub import constants

    if check_space:
        check_fits(plan)
    unchecked = [j.output for j in plan.joins if j.source == "none"]
    if delete_parts and unchecked:
        raise UsageError(_NO_HASH_TO_DELETE.format(output=", ".join(unchecked)))
    if todo and constants.is_offline_mode():
        raise HubError(f"{plan.repo.repo_id}@{plan.repo.revision}: HF_HUB_OFFLINE is set but "
                       f"{', '.join(f.remote.path for f in todo[:5])} {'is' if len(todo) == 1 else 'are'} missing "
                       f"from {plan.local_dir}; unset HF_HUB_OFFLINE to fetch them")


def _headers(token: str | bool | None) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    from ..constants import __version__

    return build_hf_headers(token=token, library_name="gptq-tools", library_version=__version__)


def _task(repo: ResolvedRepo, state: LocalState, planned: PlannedFile) -> FileTask:
    remote = planned.remote
    return FileTask(path=remote.path, url=repo.url(remote.path), size=remote.size, checksum=remote.checksum,
                    incomplete=state.incomplete_path(remote.path, remote.checksum),
                    final=state.local_dir / remote.path, root=state.local_dir)


class _Joiner:
    """Joins a part set as soon as its last part is verified, while other files keep downloading."""

    def __init__(self, plan: DownloadPlan, state: LocalState, *, delete_parts: bool, force: bool) -> None:
        self.plan = plan
        self.state = state
        self.delete_parts = delete_parts
        self.force = force
        self.lock = threading.Lock()
        self.verified = {f.remote.path for f in plan.files if f.status == "present"}
        self.pending = [j for j in plan.joins if not j.done]
        self.futures: list[Future[JoinedFile]] = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="join")
        self._submit_ready()

    def file_verified(self, task: FileTask) -> None:
        """Remember ``task`` as verified and start any join it completes."""
        self.state.mark_verified(task.path, task.checksum)
        with self.lock:
            self.verified.add(task.path)
        self._submit_ready()

    def _submit_ready(self) -> None:
        with self.lock:
            ready = [j for j in self.pending if set(j.parts) <= self.verified]
            self.pending = [j for j in self.pending if j not in ready]
            for join in ready:
                self.futures.append(self.executor.submit(self._join, join))

    def _join(self, join: PlannedJoin) -> JoinedFile:
        try:
            from ..files.join import join_parts
        except ImportError:
            raise HubError(f"{join.output}: this build of gptq-tools has no join module; the parts are downloaded "
                           f"and verified, join them with a newer gptq-tools or rerun with --no-join") from None
        expected, source = self._expected(join)
        if expected is None and self.delete_parts:
            raise UsageError(_NO_HASH_TO_DELETE.format(output=join.output))
        if expected is None:
            logger.warning("%s: no published SHA256 (none given with --sha256, in SHA256SUMS or in a preset); the "
                           "parts are verified, the joined file is not", join.output)
        folder = self.plan.local_dir
        logger.info("%s: all %d parts verified, joining", join.output, len(join.parts))
        result = join_parts([folder / p for p in join.parts], folder / join.output, expected_sha256=expected,
                            expected_source=source, force=self.force or join.output in self.plan.replaced,
                            progress=False)
        self.state.mark_verified(join.output, ("sha256", result.sha256))
        if self.delete_parts:
            _delete_joined_parts(self.state, join, expected)
        return JoinedFile(join.output, result.sha256, bool(result.verified), source)

    def _expected(self, join: PlannedJoin) -> tuple[str | None, str]:
        if join.source != "SHA256SUMS":
            return join.expected_sha256, join.source
        name = next(f.remote.path for f in self.plan.files if f.remote.path in MANIFEST_NAMES)
        expected = manifest_hash(join, self.plan.local_dir, [f.remote for f in self.plan.files])
        return expected, f"{name} in the repository"

    def close(self) -> None:
        """After a failed transfer: let running joins end, and log (not raise) what they hit."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        for future in self.futures:
            if not future.cancelled() and future.exception() is not None:
                logger.error("%s", future.exception())

    def wait(self) -> list[JoinedFile]:
        """Wait for every join; the first failure is raised."""
        self._submit_ready()
        try:
            return [future.result() for future in self.futures]
        finally:
            self.executor.shutdown(wait=True)
