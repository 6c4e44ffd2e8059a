"""What to download: ``REPO[:BRANCH]`` or a preset name, resolved to one commit, and that commit's files.

All metadata comes from huggingface_hub's ``HfApi`` (auth, ``HF_ENDPOINT``, ``HF_TOKEN``, offline mode
are its business); every request after the branch lookup is pinned to the resolved commit, so a push
during a long download cannot mix two versions of a repository.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote

from ..checkpoint.presets import Preset, parse_model_spec
from ..constants import HUB_METADATA_MAX_BYTES
from ..errors import (
    GptqToolsError,
    HubAuthError,
    HubError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsafeNameError,
)
from ..files.fileio import TEMP_PREFIX
from ..files.names import check_no_clashes, validate_relative_name

logger = logging.getLogger(__name__)

T = TypeVar("T")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: A size beyond this (4 EiB) is a lie, whatever the listing says.
_MAX_FILE_SIZE = 1 << 62
#: More entries than this in one listing (the Hub advises under 100,000 files per repository) is a server
#: paginating without end.
MAX_LISTED_ENTRIES = 1_000_000
#: More answers than this to one listing request is a server paginating without end, even when its pages are
#: empty (the Hub sends 1,000 entries a page, so 1,000 pages hold the largest listing accepted).
MAX_LISTING_PAGES = 10_000
#: Folders a Hub repository cannot contain (huggingface_hub's FORBIDDEN_FOLDERS) and where local state lives.
_RESERVED_SEGMENTS = (".git", ".cache")
_LEGACY_STATE_FOLDER = ".gptq-tools"
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


@dataclass(frozen=True)
class RepoSpec:
    """A repository and the revision asked for, before anything is looked up on the Hub."""

    repo_id: str
    revision: str
    preset: Preset | None = None


@dataclass(frozen=True)
class RemoteFile:
    """One file of a commit: its path, size and the hash that identifies its bytes.

    ``sha256`` is set for LFS files (the Hub's LFS oid); small files kept in git have only ``git_oid``
    (SHA1 of ``b"blob <size>\\0" + content``), which is checked instead.
    """

    path: str
    size: int
    git_oid: str
    sha256: str | None

    @property
    def checksum(self) -> tuple[str, str]:
        """``("sha256", hex)`` for LFS files, ``("git-sha1", hex)`` otherwise."""
        return ("sha256", self.sha256) if self.sha256 else ("git-sha1", self.git_oid)


@dataclass(frozen=True)
class ResolvedRepo:
    """A repository pinned to one commit, with the files of that commit."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[RemoteFile, ...]
    endpoint: str
    preset: Preset | None = None

    def url(self, path: str) -> str:
        """Download URL of ``path`` at the pinned commit."""
        return f"{self.endpoint}/{self.repo_id}/resolve/{self.commit}/{quote(path)}"


def parse_spec(spec: str, *, revision: str | None = None) -> RepoSpec:
    """Turn ``REPO[:BRANCH]`` or ``PRESET[:BRANCH]`` plus an optional ``--revision`` into a :class:`RepoSpec`.

    Raises:
        UsageError: the text is not a repository id or preset, or ``:BRANCH`` and ``revision`` disagree.
    """
    model = parse_model_spec(spec, revision=revision)
    return RepoSpec(repo_id=model.repo_id, revision=model.revision, preset=model.preset)


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, *, endpoint: str = "") -> Iterator[None]:
    """Turn huggingface_hub/httpx errors raised inside the block into gptq-tools' typed errors."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    endpoint = without_credentials(endpoint)  # an HF_ENDPOINT's user:password never reaches a message
    try:
        yield
    except hf_errors.GatedRepoError as exc:
        raise HubAuthError(
            f"{repo_id} is gated: accept its conditions at {endpoint or 'the Hub'}/{repo_id}, then {LOGIN_HINT} "
            f"(HTTP {_status(exc)})") from None
    except hf_errors.RepositoryNotFoundError as exc:
        raise RepoNotFoundError(
            f"repository {repo_id!r} not found on {endpoint or 'the Hub'} (HTTP {_status(exc)}); check the name "
            f"(NAMESPACE/NAME[:BRANCH]), or if it is private, {LOGIN_HINT}") from None
    except hf_errors.RevisionNotFoundError:
        raise RevisionNotFoundError(f"{where}: no such branch, tag or commit; list the branches with "
                                    f"`gptq-tools download {repo_id} --dry-run`") from None
    except hf_errors.OfflineModeIsEnabled:
        raise HubError(f"{where}: HF_HUB_OFFLINE is set, so the Hub cannot be asked what to download; "
                       f"unset it or use the files already on disk") from None
    except hf_errors.HfHubHTTPError as exc:
        status = _status(exc)
        if status in (401, 403):
            raise HubAuthError(f"{where}: access refused (HTTP {status}); {LOGIN_HINT} with a token that "
                               f"can read this repository") from None
        raise HubError(f"{where}: the Hub answered HTTP {status}: {_scrub(str(exc).strip().splitlines()[0])}; "
                       f"try again later") from None
    except httpx2.TooManyRedirects as exc:
        raise HubError(f"{where}: {_request_url(exc)} redirects in a loop ({_scrub(str(exc))}); the server or a "
                       f"proxy is misconfigured, check HF_ENDPOINT") from None
    except httpx2.TimeoutException as exc:
        raise HubError(f"{where}: {endpoint or 'the Hub'} did not answer in time ({type(exc).__name__} at "
                       f"{_request_url(exc)}, {METADATA_ATTEMPTS} attempts); check the network, a proxy, and "
                       f"HF_ENDPOINT") from None
    except httpx2.TransportError as exc:
        raise HubError(f"{where}: cannot reach {endpoint or 'the Hub'} ({type(exc).__name__}: "
                       f"{_scrub(str(exc))}); check the network and HF_ENDPOINT") from None


def _scrub(text: str) -> str:
    """``text`` (an exception's message, which may quote a URL) with any ``user:password@`` taken out."""
    return re.sub(r"(?<=//)[^/@\s]+@", "", text)


def _request_url(exc: Exception) -> str:
    """The URL of the request behind an httpx error, without its query or credentials (where it is known)."""
    try:
        request = exc.request  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError when no request is attached
        return "an unknown address"
    return str(request.url.copy_with(query=None, userinfo=b""))


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


#: Metadata requests (refs, tree listing): seconds to connect, and seconds without a byte before a read fails.
METADATA_TIMEOUTS = (15.0, 60.0)
#: Attempts per metadata request that times out or loses its connection, with doubling waits between them.
METADATA_ATTEMPTS = 3
METADATA_BACKOFF_S = 0.5


@contextlib.contextmanager
def bounded_session(timeouts: tuple[float, float], *, endpoint: str = "") -> Iterator[None]:
    """Give huggingface_hub's shared HTTP client connect and read timeouts, and bounds on API answers, for
    the block.

    Its default client waits forever (``timeout=None``): an endpoint or proxy that accepts a connection
    and never answers would hang ``download`` and ``verify --remote`` with no message. It also reads a whole
    body into memory before parsing it, so an answer that never ends (or a 50 GB one) would fill memory.
    In the block, each ``/api/`` request asks for an uncompressed answer (a compressed one could inflate
    far past any cap), and its answer is read through :class:`~gptq_tools.hub.http.CappedStream` (at most
    :data:`HUB_METADATA_MAX_BYTES`); more than :data:`MAX_LISTING_PAGES` answers (a listing paginating
    without end, even with empty pages) is refused too. The client's own timeout and hooks are put back
    afterwards, so a caller's configuration outlives the call.
    """
    import httpx2
    from huggingface_hub.utils import get_session

    session = get_session()
    saved = session.timeout
    session.timeout = httpx2.Timeout(timeouts[1], connect=timeouts[0], pool=None)
    answers = itertools.count(1)
    hooks = {"request": _ask_uncompressed,
             "response": functools.partial(_bound_api_answer, endpoint=endpoint, answers=answers)}
    for kind, hook in hooks.items():
        session.event_hooks[kind].append(hook)
    try:
        yield
    finally:
        session.timeout = saved
        for kind, hook in hooks.items():
            with contextlib.suppress(ValueError):
                session.event_hooks[kind].remove(hook)


def _is_api(url: object) -> bool:
    return "/api/" in getattr(url, "path", "")  # file bytes have their own bounds (the listed size)


def _ask_uncompressed(request: object) -> None:
    """Request hook: an API answer must come uncompressed, so that the byte cap bounds what is parsed."""
    if _is_api(getattr(request, "url", None)):
        request.headers["Accept-Encoding"] = "identity"  # type: ignore[attr-defined]


def _bound_api_answer(response: object, *, endpoint: str, answers: Iterator[int]) -> None:
    """Response hook: refuse an API answer that is compressed, declares more than the cap, or is one page too
    many; cap what is read of the others."""
    import httpx2

    from .http import CappedStream

    if not isinstance(response, httpx2.Response) or not _is_api(response.request.url):
        return
    limit = HUB_METADATA_MAX_BYTES
    url = str(response.request.url.copy_with(query=None, userinfo=b""))
    where = endpoint or "the Hub"
    if next(answers) > MAX_LISTING_PAGES:
        raise HubError(f"{where}: {url} is answer {MAX_LISTING_PAGES + 1:,} to one listing request; the server is "
                       f"paginating without end: check HF_ENDPOINT (or a proxy)")
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise HubError(f"{where}: the answer to {url} comes compressed ({encoding}) though it was asked for "
                       f"uncompressed, so its size cannot be bounded; check HF_ENDPOINT (or a proxy)")
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(url, endpoint, limit, f"declares {int(declared):,} bytes")
    response.stream = CappedStream(response.stream, limit=limit,
                                   on_excess=lambda: _too_large(url, endpoint, limit, "goes on past that"))


def _too_large(url: str, endpoint: str, limit: int, how: str) -> HubError:
    return HubError(f"{endpoint or 'the Hub'}: the answer to {url} {how}, more than the {limit:,} bytes a Hub "
                    f"listing may take; the server is not answering like the Hub: check HF_ENDPOINT (or a proxy)")


def _retrying(call: Callable[[], T], *, what: str) -> T:
    """``call()``, retried after a timeout or a lost connection with the download's backoff (doubling)."""
    import httpx2

    for attempt in range(1, METADATA_ATTEMPTS + 1):
        try:
            return call()
        except (httpx2.TimeoutException, httpx2.NetworkError) as exc:
            if attempt == METADATA_ATTEMPTS:
                raise
            delay = METADATA_BACKOFF_S * 2 ** (attempt - 1)
            logger.warning("%s: %s (%s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def resolve_repo(spec: RepoSpec, *, endpoint: str | None = None, token: str | bool | None = None,
                 timeouts: tuple[float, float] | None = None) -> ResolvedRepo:
    """Resolve ``spec.revision`` to a commit and list that commit's files (sizes and hashes).

    Args:
        spec: the repository and revision (from :func:`parse_spec`).
        endpoint: Hub base URL; default huggingface_hub's (``HF_ENDPOINT``).
        token: Hub token; None lets huggingface_hub find one (``HF_TOKEN``, ``hf auth login``).
        timeouts: (connect, read) seconds for each metadata request (default :data:`METADATA_TIMEOUTS`);
            a request that times out is tried
            :data:`METADATA_ATTEMPTS` times, then reported as a :class:`HubError` naming the endpoint.

    Returns:
        The repository pinned to one commit, its files sorted by path.

    Raises:
        RepoNotFoundError, RevisionNotFoundError, HubAuthError, HubError: see :func:`hub_errors`.
    """
    from huggingface_hub import HfApi, constants

    base = (endpoint or constants.ENDPOINT).rstrip("/")
    shown = without_credentials(base)  # what messages name: never an HF_ENDPOINT's user:password
    api = HfApi(endpoint=base, token=token)
    timeouts = timeouts or METADATA_TIMEOUTS
    where = f"{spec.repo_id}@{spec.revision}"
    with hub_errors(spec.repo_id, spec.revision, endpoint=shown), _expect_shape(where, "list of branches", shown), \
            bounded_session(timeouts, endpoint=shown):
        commit = _retrying(lambda: _resolve_commit(api, spec), what=f"{shown}: branches of {spec.repo_id}")
    with hub_errors(spec.repo_id, commit, endpoint=shown), _expect_shape(where, "file listing", shown), \
            bounded_session(timeouts, endpoint=shown):
        listed = _retrying(lambda: list(itertools.islice(api.list_repo_tree(spec.repo_id, revision=commit,
                                                                            recursive=True), MAX_LISTED_ENTRIES + 1)),
                           what=f"{shown}: file listing of {where}")
        if len(listed) > MAX_LISTED_ENTRIES:
            raise HubError(f"{where}: the file listing from {shown} goes on past {MAX_LISTED_ENTRIES} entries; the "
                           f"server is paginating without end, check HF_ENDPOINT")
        entries = [e for e in listed if hasattr(e, "blob_id")]
        raw = [(e.path, e.size, e.blob_id, e.lfs.sha256 if e.lfs is not None else None,
                e.lfs.size if e.lfs is not None else None) for e in entries]
    files = checked_files(raw, where=where)
    logger.info("%s@%s is commit %s (%d files)", spec.repo_id, spec.revision, commit, len(files))
    return ResolvedRepo(repo_id=spec.repo_id, revision=spec.revision, commit=commit, files=files, endpoint=base,
                        preset=spec.preset)


@contextlib.contextmanager
def _expect_shape(where: str, what: str, endpoint: str) -> Iterator[None]:
    """Turn the errors huggingface_hub raises on JSON of the wrong shape into one :class:`HubError` line."""
    try:
        yield
    except GptqToolsError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise HubError(f"{where}: the {what} from {endpoint} is not in the shape the Hub API returns "
                       f"({type(exc).__name__}: {exc}); check that HF_ENDPOINT points to a Hugging Face Hub") from None


def checked_files(entries: list[tuple[object, object, object, object, object]], *,
                  where: str) -> tuple[RemoteFile, ...]:
    """Files of a listing, every field checked before any of it is used, sorted by path.

    Args:
        entries: ``(path, size, git_oid, lfs_sha256 or None, lfs_size or None)`` as the server sent them.
        where: ``REPO@REVISION``, for the messages.

    Returns:
        The files, each with a safe relative path, a plausible size and well-formed hashes.

    Raises:
        UnsafeNameError: a path is unsafe, lies where the Hub never puts files, or clashes with another.
        HubError: a size or hash is not what the Hub sends (wrong type, not hex, sizes that disagree).
    """
    files = [_checked_file(*entry, where=where) for entry in entries]
    check_no_clashes((f.path for f in files), what=where)
    return tuple(sorted(files, key=lambda f: f.path))


def _checked_file(path: object, size: object, git_oid: object, sha256: object, lfs_size: object, *,
                  where: str) -> RemoteFile:
    name = validate_relative_name(path, what=f"{where}: file")  # type: ignore[arg-type]
    segments = name.split("/")
    reserved = next((s for s in segments if s in _RESERVED_SEGMENTS), None)
    if reserved is not None or segments[0] == _LEGACY_STATE_FOLDER or segments[-1].startswith(TEMP_PREFIX):
        raise UnsafeNameError(f"{where}: file {name!r} lies where no Hub repository has files (a "
                              f"{reserved or segments[0]!r} folder or a gptq-tools temporary name), where local "
                              f"state is kept; nothing was written. Ask the repository owner to rename it")
    if type(size) is not int or not 0 <= size <= _MAX_FILE_SIZE:
        raise HubError(f"{where}: the listing gives {name!r} the size {size!r}, which is not a byte count; "
                       f"the server is not answering like the Hub, nothing was written")
    if not isinstance(git_oid, str) or not _COMMIT_RE.match(git_oid):
        raise HubError(f"{where}: the listing gives {name!r} the git oid {git_oid!r}, not 40 lowercase hex "
                       f"characters; the server is not answering like the Hub, nothing was written")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256_RE.match(sha256)):
        raise HubError(f"{where}: the listing gives {name!r} the LFS oid {sha256!r}, not a SHA256 (64 lowercase "
                       f"hex characters); the server is not answering like the Hub, nothing was written")
    if sha256 is not None and lfs_size != size:
        raise HubError(f"{where}: the listing gives {name!r} {size!r} bytes but its LFS object {lfs_size!r} bytes; "
                       f"the listing contradicts itself, nothing was written")
    return RemoteFile(path=name, size=size, git_oid=git_oid, sha256=sha256)


def without_credentials(url: str) -> str:
    """``url`` without a ``user:password@`` part (an ``HF_ENDPOINT`` may carry one; it is never saved)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def listing_of(repo: ResolvedRepo) -> dict[str, object]:
    """``repo`` as JSON-ready data (saved after a download, so an offline re-run knows the files)."""
    return {"repo_id": repo.repo_id, "commit": repo.commit, "endpoint": without_credentials(repo.endpoint),
            "files": [{"path": f.path, "size": f.size, "git_oid": f.git_oid, "sha256": f.sha256} for f in repo.files]}


def offline_repo(spec: RepoSpec, listing: dict[str, object] | None, *, where: str) -> ResolvedRepo:
    """The repository as remembered in ``where`` for offline use (``HF_HUB_OFFLINE``).

    Raises:
        HubError: nothing was remembered for this repository and revision.
    """
    if listing is None or listing.get("repo_id") != spec.repo_id:
        raise HubError(f"{spec.repo_id}@{spec.revision}: HF_HUB_OFFLINE is set and {where} holds no earlier download "
                       f"of it; unset HF_HUB_OFFLINE to fetch it")
    saved = f"{spec.repo_id}@{spec.revision} (saved in {where})"
    with _expect_shape(saved, "file listing", where):
        raw = [(f["path"], f["size"], f["git_oid"], f.get("sha256"), f["size"])
               for f in listing["files"]]  # type: ignore[attr-defined]
        files = checked_files(raw, where=saved)
    commit = listing.get("commit")
    if not isinstance(commit, str) or not _COMMIT_RE.match(commit):
        raise HubError(f"{saved}: the saved commit {commit!r} is not 40 lowercase hex characters; unset "
                       f"HF_HUB_OFFLINE to fetch the listing again")
    logger.info("%s@%s: offline, using the listing of commit %s saved in %s", spec.repo_id, spec.revision,
                commit, where)
    return ResolvedRepo(repo_id=spec.repo_id, revision=spec.revision, commit=commit, files=files,
                        endpoint=str(listing.get("endpoint", "")), preset=spec.preset)


def _resolve_commit(api: object, spec: RepoSpec) -> str:
    refs = api.list_repo_refs(spec.repo_id)  # type: ignore[attr-defined]
    for ref in list(refs.branches) + list(refs.tags):
        if spec.revision in (ref.name, ref.ref):
            commit = ref.target_commit
            if not isinstance(commit, str) or not _COMMIT_RE.match(commit):
                raise HubError(f"{spec.repo_id}@{spec.revision}: the Hub gives the commit {commit!r}, not 40 "
                               f"lowercase hex characters; the server is not answering like the Hub")
            return commit
    if _COMMIT_RE.match(spec.revision):
        return spec.revision
    known = ", ".join(sorted(b.name for b in refs.branches)) or "none"
    raise RevisionNotFoundError(f"{spec.repo_id} has no branch or tag {spec.revision!r}; its branches: {known}. "
                                f"Write it as {spec.repo_id}:BRANCH")
