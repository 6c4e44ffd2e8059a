"""What to download: ``REPO[:BRANCH]`` or a preset name, resolved to one commit, and that commit's files.

All metadata comes from huggingface_hub's ``HfApi`` (auth, ``HF_ENDPOINT``, ``HF_TOKEN``, offline mode
are its business); every request after the branch lookup is pinned to the resolved commit, so a push
during a long download cannot mix two versions of a repository.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

from ..errors import (
    HubAuthError,
    HubError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from ..presets import Preset, parse_model_spec

logger = logging.getLogger(__name__)

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
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
        raise HubError(f"{where}: the Hub answered HTTP {status}: {str(exc).strip().splitlines()[0]}; "
                       f"try again later") from None
    except httpx2.TransportError as exc:
        raise HubError(f"{where}: cannot reach {endpoint or 'the Hub'} ({type(exc).__name__}: {exc}); check "
                       f"the network and HF_ENDPOINT") from None


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def resolve_repo(spec: RepoSpec, *, endpoint: str | None = None, token: str | bool | None = None) -> ResolvedRepo:
    """Resolve ``spec.revision`` to a commit and list that commit's files (sizes and hashes).

    Args:
        spec: the repository and revision (from :func:`parse_spec`).
        endpoint: Hub base URL; default huggingface_hub's (``HF_ENDPOINT``).
        token: Hub token; None lets huggingface_hub find one (``HF_TOKEN``, ``hf auth login``).

    Returns:
        The repository pinned to one commit, its files sorted by path.

    Raises:
        RepoNotFoundError, RevisionNotFoundError, HubAuthError, HubError: see :func:`hub_errors`.
    """
    from huggingface_hub import HfApi, constants

    base = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=base, token=token)
    with hub_errors(spec.repo_id, spec.revision, endpoint=base):
        commit = _resolve_commit(api, spec)
    with hub_errors(spec.repo_id, commit, endpoint=base):
        entries = api.list_repo_tree(spec.repo_id, revision=commit, recursive=True)
        files = [RemoteFile(path=e.path, size=int(e.size), git_oid=e.blob_id,
                            sha256=e.lfs.sha256 if e.lfs is not None else None)
                 for e in entries if hasattr(e, "blob_id")]
    logger.info("%s@%s is commit %s (%d files)", spec.repo_id, spec.revision, commit, len(files))
    return ResolvedRepo(repo_id=spec.repo_id, revision=spec.revision, commit=commit,
                        files=tuple(sorted(files, key=lambda f: f.path)), endpoint=base, preset=spec.preset)


def listing_of(repo: ResolvedRepo) -> dict[str, object]:
    """``repo`` as JSON-ready data (saved after a download, so an offline re-run knows the files)."""
    return {"repo_id": repo.repo_id, "commit": repo.commit, "endpoint": repo.endpoint,
            "files": [{"path": f.path, "size": f.size, "git_oid": f.git_oid, "sha256": f.sha256} for f in repo.files]}


def offline_repo(spec: RepoSpec, listing: dict[str, object] | None, *, where: str) -> ResolvedRepo:
    """The repository as remembered in ``where`` for offline use (``HF_HUB_OFFLINE``).

    Raises:
        HubError: nothing was remembered for this repository and revision.
    """
    if listing is None or listing.get("repo_id") != spec.repo_id:
        raise HubError(f"{spec.repo_id}@{spec.revision}: HF_HUB_OFFLINE is set and {where} holds no earlier download "
                       f"of it; unset HF_HUB_OFFLINE to fetch it")
    files = tuple(RemoteFile(path=str(f["path"]), size=int(f["size"]), git_oid=str(f["git_oid"]),
                             sha256=f.get("sha256")) for f in listing["files"])  # type: ignore[attr-defined]
    logger.info("%s@%s: offline, using the listing of commit %s saved in %s", spec.repo_id, spec.revision,
                listing["commit"], where)
    return ResolvedRepo(repo_id=spec.repo_id, revision=spec.revision, commit=str(listing["commit"]), files=files,
                        endpoint=str(listing.get("endpoint", "")), preset=spec.preset)


def _resolve_commit(api: object, spec: RepoSpec) -> str:
    refs = api.list_repo_refs(spec.repo_id)  # type: ignore[attr-defined]
    for ref in list(refs.branches) + list(refs.tags):
        if spec.revision in (ref.name, ref.ref):
            return str(ref.target_commit)
    if _COMMIT_RE.match(spec.revision):
        return spec.revision
    known = ", ".join(sorted(b.name for b in refs.branches)) or "none"
    raise RevisionNotFoundError(f"{spec.repo_id} has no branch or tag {spec.revision!r}; its branches: {known}. "
                                f"Write it as {spec.repo_id}:BRANCH")
