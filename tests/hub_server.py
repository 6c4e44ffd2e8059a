"""A Hub-compatible HTTP server for tests and benchmarks (127.0.0.1, ephemeral port, one thread).

It serves the endpoints huggingface_hub (``HfApi`` and ``snapshot_download``) and gptq-tools use:
``/api/models/{repo}/revision/{rev}``, ``/api/models/{repo}/tree/{rev}[/{path}]`` (paginated with a
``Link`` header), ``POST /api/models/{repo}/paths-info/{rev}``, ``/api/models/{repo}/refs`` and
``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``,
``X-Linked-Size`` and HTTP ``Range``. Errors carry the ``X-Error-Code`` header the real Hub sends
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``), so the real client raises its
real exceptions.

Repositories are ``namespace/name``; each branch maps file paths to ``bytes`` or to a ``Path`` on disk
(served with ``sendfile``, so a benchmark measures the client, not the server). Faults are injected per
file with :meth:`HubServer.add_fault`.

Hostile mode, for the tests of untrusted input: :meth:`HubServer.set_raw_tree` makes a branch's tree
listing (and ``Repo.raw_refs`` the list of branches) any JSON value, or raw bytes: names with ``..``,
NUL or a file/folder clash, malformed oids, fields of the wrong type (:func:`tree_entry` builds
entries). ``ServedFile.listed_size`` makes the listing lie about a file's size while the real bytes are
served; the ``redirect_loop`` fault answers every matching request with a redirect to itself
(``api:tree``, ``api:refs``... match the API routes); the ``overlong`` fault sends a whole file plus
trailing bytes, unframed (no ``Content-Length``); ``Repo.endless_tree`` paginates the listing forever;
the ``endless_body`` fault (``api:tree``, ``api:refs``) answers with a JSON listing that never ends (unframed,
or with a ``Content-Length`` of ``declared_bytes``, a ``Content-Encoding`` of ``content_encoding`` when those are
set), until the client hangs up.
Byte-identical files in one branch are served as they are (same LFS oid, two paths).

The upload side answers what ``HfApi.create_repo``, ``create_branch`` and ``create_commit``/``upload_folder``
send when Xet is off (huggingface_hub 2.x picks Xet on the client whenever ``hf_xet`` is installed, so the
caller sets ``HF_HUB_DISABLE_XET=1``): ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{b}``,
``POST /api/validate-yaml``, ``POST /api/models/{repo}/preupload/{rev}`` (LFS for weight suffixes and files
of 10 MiB or more), the LFS batch API ``POST /{repo}.git/info/lfs/objects/batch`` (the *basic* transfer,
whose upload and verify actions point back here: ``PUT /lfs-upload/{oid}``, ``POST /lfs-verify/{oid}``; an
object already stored gets no actions, as on the Hub, so a rerun sends only what is missing) and
``POST /api/models/{repo}/commit/{rev}`` (ndjson). ``/api/models/{repo}/xet-write-token/...`` answers 501
with a message saying so. Writes need a token from ``HubServer.tokens``. A commit becomes the branch's new
head, served by the download endpoints above; earlier commits stay resolvable by their id.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

if TYPE_CHECKING:
    from typing import Self

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024
FAULT_KINDS = ("drop", "error500", "rate_limit", "ignore_range", "corrupt", "stall", "slow", "redirect_loop",
               "overlong", "endless_body")


@dataclass
class ServedFile:
    """One file of one branch: its bytes (in memory or on disk) and its Hub metadata."""

    path: str
    size: int
    git_oid: str
    sha256: str | None  # set for LFS files
    data: bytes | None = None
    disk_path: Path | None = None
    listed_size: int | None = None  # hostile: the size the listing gives instead of the real one

    def read(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        assert self.disk_path is not None
        with open(self.disk_path, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)

    def tree_entry(self) -> dict[str, Any]:
        size = self.size if self.listed_size is None else self.listed_size
        return tree_entry(self.path, size, self.git_oid, self.sha256)


def tree_entry(path: Any, size: Any, git_oid: Any, sha256: Any = None, *, lfs_size: Any = None) -> dict[str, Any]:
    """A ``/tree`` entry as the Hub sends it, with any values (hostile listings put wrong ones in)."""
    entry: dict[str, Any] = {"type": "file", "oid": git_oid, "size": size, "path": path}
    if sha256 is not None:
        entry["lfs"] = {"oid": sha256, "size": size if lfs_size is None else lfs_size, "pointerSize": 134}
    return entry


@dataclass
class Fault:
    """A fault injected into ``GET .../resolve/...`` of files matching ``pattern``.

    ``times`` is how many requests it hits (None: all). ``after_bytes``: bytes sent before a drop/stall.
    ``retry_after``: seconds for 429. ``seconds``: stall length. ``rate``: bytes per second for ``slow``.
    """

    kind: str
    pattern: str = "*"
    times: int | None = 1
    after_bytes: int = 0
    retry_after: int = 1
    seconds: float = 30.0
    rate: int = 1024 * 1024
    hits: int = 0
    declared_bytes: int | None = None  # endless_body: the Content-Length it claims (None: unframed)
    content_encoding: str | None = None  # endless_body: the Content-Encoding it claims (None: none)


@dataclass
class Repo:
    repo_id: str
    branches: dict[str, dict[str, ServedFile]]
    commits: dict[str, str]
    gated: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    raw_trees: dict[str, Any] = field(default_factory=dict)  # hostile: branch -> listing served as it is
    raw_refs: Any = None  # hostile: served instead of the branches and tags
    endless_tree: bool = False  # hostile: every tree page links to itself as the next page
    snapshots: dict[str, dict[str, ServedFile]] = field(default_factory=dict)  # earlier commits, by id


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256_path(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def make_file(path: str, content: bytes | Path, *, lfs: bool | None = None) -> ServedFile:
    """Build a :class:`ServedFile`; LFS when the name has a weights suffix or the file is >= 10 MiB."""
    size = len(content) if isinstance(content, bytes) else content.stat().st_size
    if lfs is None:
        lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
    if lfs:
        sha = hashlib.sha256(content).hexdigest() if isinstance(content, bytes) else _sha256_path(content)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
        oid = _git_blob_oid(pointer)
    else:
        data = content if isinstance(content, bytes) else content.read_bytes()
        sha, oid = None, _git_blob_oid(data)
    if isinstance(content, bytes):
        return ServedFile(path, size, oid, sha, data=content)
    return ServedFile(path, size, oid, sha, disk_path=content)


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-exchange (the hostile tests make it do so) is not a server error: without
    this, socketserver prints its traceback to stderr, inside the output the tests assert on."""

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class HubServer:
    """A fake Hub in a thread. Use as a context manager; ``endpoint`` is the base URL."""

    def __init__(self, *, page_size: int = 1000, redirect_lfs: bool = False, port: int = 0) -> None:
        self.port = port  # 0: an ephemeral port
        self.redirect_lfs = redirect_lfs  # LFS files answer 302 to a "CDN" host (localhost), as the Hub does
        self.repos: dict[str, Repo] = {}
        self.faults: list[Fault] = []
        self.tokens: set[str] = {"hf_valid_token"}
        self.page_size = page_size
        self.requests: list[tuple[str, str, str | None]] = []
        self.lfs_objects: dict[str, bytes] = {}  # uploaded LFS objects, by sha256
        self.commits_made: list[dict[str, Any]] = []  # each accepted commit: repo, branch, header, paths
        self.api_request_headers: list[dict[str, str]] = []  # lower-cased headers of each /api/ request
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- set-up -------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, branches: dict[str, dict[str, bytes | Path | ServedFile]], *,
                 gated: bool = False) -> Repo:
        """Serve ``repo_id`` with ``branches`` (branch -> {path: bytes | Path | ServedFile})."""
        built: dict[str, dict[str, ServedFile]] = {}
        commits: dict[str, str] = {}
        for branch, files in branches.items():
            built[branch] = {p: c if isinstance(c, ServedFile) else make_file(p, c) for p, c in files.items()}
            listing = json.dumps(sorted((f.path, f.git_oid) for f in built[branch].values()))
            commits[branch] = hashlib.sha1(f"{repo_id}\0{branch}\0{listing}".encode()).hexdigest()
        repo = Repo(repo_id, built, commits, gated=gated)
        self.repos[repo_id] = repo
        return repo

    def set_raw_tree(self, repo_id: str, branch: str, listing: Any) -> None:
        """Hostile mode: serve ``listing`` (any JSON value, or ``bytes`` sent as they are) as the branch's tree."""
        self.repos[repo_id].raw_trees[branch] = listing

    def add_fault(self, kind: str, pattern: str = "*", **options: Any) -> Fault:
        """Inject a fault (see :class:`Fault`): drop, error500, rate_limit, ignore_range, corrupt, stall, slow,
        redirect_loop (``pattern`` ``api:tree`` etc. for API routes) or overlong."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        fault = Fault(kind, pattern, **options)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def take_fault(self, path: str, kinds: tuple[str, ...]) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.kind in kinds and fnmatch.fnmatch(path, fault.pattern) and (
                        fault.times is None or fault.hits < fault.times):
                    fault.hits += 1
                    return fault
        return None

    def resolve_requests(self, path_suffix: str = "") -> list[tuple[str, str, str | None]]:
        """Logged ``(method, url path, Range header)`` of resolve requests ending with ``path_suffix``."""
        return [r for r in self.requests if "/resolve/" in r[1] and r[1].endswith(path_suffix)]

    # -- life cycle ---------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        handler = type("Handler", (_Handler,), {"hub": self})
        httpd = _QuietServer(("127.0.0.1", self.port), handler)
        httpd.daemon_threads = True
        httpd.request_queue_size = 128
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_API_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)"
                     r"(?:/(?P<what>revision|tree|paths-info|refs)(?:/(?P<rest>.*))?)?$")
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN_RE = re.compile(r"^/lfs-cdn/(?P<sha>[0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    wbufsize = 0

    def log_message(self, format: str, *args: Any) -> None:
        return

    # -- plumbing -----------------------------------------------------------------------------------
    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send_json({"error": message}, status, headers)

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._send_error(401, "RepoNotFound", "Repository not found")
            return None
        if repo.gated:
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ").strip()
            if not token:
                self._send_error(401, "GatedRepo", "Access to model is restricted. You must be authenticated.")
                return None
            if token not in self.hub.tokens:
                self._send_error(403, "GatedRepo",
                                 "Access to model is restricted and you are not in the authorized list.")
                return None
        return repo

    def _branch(self, repo: Repo, rev: str) -> tuple[str, dict[str, ServedFile]] | None:
        rev = unquote(rev)
        if rev in repo.branches:
            return repo.commits[rev], repo.branches[rev]
        for branch, commit in repo.commits.items():
            if commit == rev:
                return commit, repo.branches[branch]
        if rev in repo.snapshots:
            return rev, repo.snapshots[rev]
        self._send_error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return None

    # -- verbs --------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append((self.command, url.path, self.headers.get("Range")))
        api = _API_RE.match(url.path)
        resolve = _RESOLVE_RE.match(url.path)
        cdn = _CDN_RE.match(url.path)
        if api:
            self.hub.api_request_headers.append({k.lower(): v for k, v in self.headers.items()})
        try:
            if _upload_route(self, url.path):
                return
            if cdn:
                self._cdn(cdn.group("sha"))
            elif api:
                self._api(api.group("repo"), api.group("what"), api.group("rest") or "", parse_qs(url.query))
            elif resolve:
                self._resolve(resolve.group("repo"), resolve.group("rev"), unquote(resolve.group("path")))
            else:
                self._send_error(404, None, f"no route for {url.path}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _redirect_loop(self, pattern_path: str) -> bool:
        if self.hub.take_fault(pattern_path, ("redirect_loop",)) is None:
            return False
        self.send_response(302)
        self.send_header("Location", self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def _endless_body(self, pattern_path: str) -> bool:
        """Hostile: a JSON list of tree entries that never ends (until the client goes or the server stops)."""
        fault = self.hub.take_fault(pattern_path, ("endless_body",))
        if fault is None:
            return False
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if fault.declared_bytes is not None:
            self.send_header("Content-Length", str(fault.declared_bytes))
        if fault.content_encoding is not None:
            self.send_header("Content-Encoding", fault.content_encoding)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        entry = json.dumps(tree_entry("x" * 200, 1, "0" * 40)).encode() + b","
        self.wfile.write(b"[")
        while not self.hub.stopping.is_set():
            self.wfile.write(entry * 256)  # raises BrokenPipeError once the client has hung up
        return True

    def _api(self, repo_id: str, what: str | None, rest: str, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id)
        if repo is None or self._redirect_loop(f"api:{what}") or self._endless_body(f"api:{what}"):
            return
        if what == "refs" and repo.raw_refs is not None:
            self._send_raw(repo.raw_refs)
            return
        if what is None:  # repo_info without a revision: the default branch
            what, rest = "revision", "main"
        if what == "refs":
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.commits.items()]
            tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c} for t, c in repo.tags.items()]
            self._send_json({"branches": branches, "tags": tags, "converts": [], "pullRequests": []})
            return
        rev, _, sub_path = rest.partition("/")
        found = self._branch(repo, rev)
        if found is None:
            return
        commit, files = found
        if what == "revision":
            siblings = [{"rfilename": f.path, "size": f.size, "blobId": f.git_oid,
                         **({"lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 134}} if f.sha256 else {})}
                        for f in files.values()]
            self._send_json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": False,
                             "gated": "auto" if repo.gated else False, "siblings": siblings, "tags": []})
        elif what == "tree":
            self._tree(repo, rev, commit, files, unquote(sub_path), query)
        else:
            self._paths_info(files)

    def _tree(self, repo: Repo, rev: str, commit: str, files: dict[str, ServedFile], sub_path: str,
              query: dict[str, list[str]]) -> None:
        branch = next((b for b, c in repo.commits.items() if c == commit), None)
        if branch is not None and branch in repo.raw_trees:
            self._send_raw(repo.raw_trees[branch])
            return
        recursive = query.get("recursive", ["False"])[0].lower() in {"1", "true"}
        prefix = f"{sub_path.strip('/')}/" if sub_path.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if recursive or "/" not in rest:
                entries[path] = files[path].tree_entry()
            else:
                folder = prefix + rest.split("/", 1)[0]
                entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
            if recursive:  # the Hub lists the folders too
                parts = rest.split("/")[:-1]
                for depth in range(1, len(parts) + 1):
                    folder = prefix + "/".join(parts[:depth])
                    entries.setdefault(folder, {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
        listing = [entries[key] for key in sorted(entries)]
        start = int(query.get("cursor", ["0"])[0])
        page = listing[start:start + self.hub.page_size]
        headers = {}
        if repo.endless_tree:
            headers["Link"] = f'<{self.hub.endpoint}{self.path}>; rel="next"'
        elif start + self.hub.page_size < len(listing):
            next_url = (f"{self.hub.endpoint}/api/models/{repo.repo_id}/tree/{quote(rev, safe='')}"
                        f"{'/' + quote(sub_path) if sub_path else ''}?recursive={recursive}"
                        f"&cursor={start + self.hub.page_size}")
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(page, headers=headers)

    def _send_raw(self, listing: Any) -> None:
        body = listing if isinstance(listing, bytes) else json.dumps(listing).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _paths_info(self, files: dict[str, ServedFile]) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode()) if length else {}
        wanted = form.get("paths", [])
        self._send_json([files[p].tree_entry() for p in wanted if p in files])

    # -- file bytes ---------------------------------------------------------------------------------
    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        found = self._branch(repo, rev)
        if found is None:
            return
        commit, files = found
        served = files.get(path)
        if served is None:
            self._send_error(404, "EntryNotFound", f"{path} does not exist on {rev}")
            return
        if self._redirect_loop(path):
            return
        if served.sha256 and self.hub.redirect_lfs:
            self._redirect(served, commit)
            return
        self._serve(served, commit, path)

    def _redirect(self, served: ServedFile, commit: str) -> None:
        port = self.hub.endpoint.rsplit(":", 1)[1]
        self.send_response(302)
        self.send_header("Location", f"http://localhost:{port}/lfs-cdn/{served.sha256}")
        self.send_header("ETag", f'"{served.git_oid}"')
        self.send_header("X-Repo-Commit", commit)
        self.send_header("X-Linked-Etag", f'"{served.sha256}"')
        self.send_header("X-Linked-Size", str(served.size))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _cdn(self, sha: str) -> None:
        if self.headers.get("Authorization"):
            self._send_error(400, None, "the CDN must not receive the Hub token")
            return
        for repo in self.hub.repos.values():
            for branch, files in repo.branches.items():
                for served in files.values():
                    if served.sha256 == sha:
                        self._serve(served, repo.commits[branch], served.path)
                        return
        self._send_error(404, None, "no such object")

    def _serve(self, served: ServedFile, commit: str, path: str) -> None:
        if self.command == "GET" and self._early_fault(path):
            return
        if self.command == "GET" and self.hub.take_fault(path, ("overlong",)):
            self._send_overlong(served)
            return
        start, end = 0, served.size
        range_header = self.headers.get("Range")
        ranged = False
        if range_header and not (self.command == "GET" and self.hub.take_fault(path, ("ignore_range",))):
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if match is None or int(match.group(1)) >= max(served.size, 1):
                self._send_error(416, None, f"bad range {range_header}")
                return
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, served.size) if match.group(2) else served.size
            ranged = True
        self.send_response(206 if ranged else 200)
        etag = served.sha256 or served.git_oid
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", commit)
        if served.sha256:
            self.send_header("X-Linked-Etag", f'"{served.sha256}"')
            self.send_header("X-Linked-Size", str(served.size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{served.size}")
        self.end_headers()
        if self.command == "GET":
            self._send_body(served, path, start, end)

    def _send_overlong(self, served: ServedFile) -> None:
        """The whole file and then more bytes, framed only by closing the connection."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(served.read(0, served.size) + b"\0" * 4096)
        self.close_connection = True

    def _early_fault(self, path: str) -> bool:
        fault = self.hub.take_fault(path, ("error500", "rate_limit"))
        if fault is None:
            return False
        if fault.kind == "error500":
            self._send_error(500, None, "Internal Error (injected)")
        else:
            self._send_json({"error": "rate limited"}, 429, {"Retry-After": str(fault.retry_after)})
        return True

    def _send_body(self, served: ServedFile, path: str, start: int, end: int) -> None:
        fault = self.hub.take_fault(path, ("drop", "stall", "corrupt", "slow"))
        if fault is None:
            self._sendfile(served, start, end)
        elif fault.kind in ("drop", "stall"):
            cut = min(start + fault.after_bytes, end)
            self.wfile.write(served.read(start, cut))
            if fault.kind == "stall":
                self.hub.stopping.wait(fault.seconds)
            self.close_connection = True
            self.connection.shutdown(2)
        elif fault.kind == "corrupt":
            data = bytearray(served.read(start, end))
            if data:
                data[len(data) // 2] ^= 0xFF
            self.wfile.write(bytes(data))
        else:
            self._send_slowly(served, start, end, fault.rate)

    def _send_slowly(self, served: ServedFile, start: int, end: int, rate: int) -> None:
        step = max(rate // 20, 1)
        for offset in range(start, end, step):
            if self.hub.stopping.is_set():
                self.close_connection = True
                return
            self.wfile.write(served.read(offset, min(offset + step, end)))
            time.sleep(0.05)

    def _sendfile(self, served: ServedFile, start: int, end: int) -> None:
        if served.disk_path is None:
            self.wfile.write(memoryview(served.data or b"")[start:end])
            return
        with open(served.disk_path, "rb") as handle:
            offset = start
            while offset < end:
                sent = os.sendfile(self.connection.fileno(), handle.fileno(), offset, min(end - offset, 1 << 30))
                if sent == 0:
                    raise ConnectionResetError("client went away")
                offset += sent

# -- the upload side ----------------------------------------------------------------------------------
_WRITE_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<what>branch|preupload|commit|xet-write-token)"
                       r"(?:/(?P<rev>.*))?$")
_BATCH_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_RE = re.compile(r"^/lfs-(?P<what>upload|verify)/(?P<oid>[0-9a-f]{64})$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: What a repository holds right after ``create_repo`` on the Hub.
INITIAL_GITATTRIBUTES = (b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                         b"*.bin filter=lfs diff=lfs merge=lfs -text\n")
XET_REFUSAL = ("this test Hub speaks only the LFS basic transfer, not Xet: set HF_HUB_DISABLE_XET=1 for the "
               "uploading process")


def _upload_route(handler: _Handler, path: str) -> bool:
    """Answer an upload-side request; False when ``path`` is not one (the download routes take it).

    The body is read first, whatever the answer, so the connection stays usable for the next request."""
    lfs, batch, write = _LFS_RE.match(path), _BATCH_RE.match(path), _WRITE_RE.match(path)
    known = path in ("/api/validate-yaml", "/api/repos/create") or lfs or batch or write
    if not known or handler.command not in ("POST", "PUT", "GET"):
        return False
    if write and write.group("what") == "xet-write-token":
        handler._send_error(501, None, XET_REFUSAL)
        return True
    if handler.command == "GET":
        return False
    body = _read_body(handler)
    if path == "/api/validate-yaml":
        handler._send_json({"errors": [], "warnings": []})
    elif lfs:
        (_lfs_upload if lfs.group("what") == "upload" else _lfs_verify)(handler, lfs.group("oid"), body)
    elif not _authorized(handler):
        pass
    elif path == "/api/repos/create":
        _create_repo(handler, body)
    else:
        repo = handler.hub.repos.get((batch or write).group("repo"))  # type: ignore[union-attr]
        if repo is None:
            handler._send_error(404, "RepoNotFound", "Repository not found")
        elif batch:
            _lfs_batch(handler, body)
        else:
            rev = unquote(write.group("rev") or "main")  # type: ignore[union-attr]
            routes = {"branch": _create_branch, "preupload": _preupload, "commit": _commit}
            routes[write.group("what")](handler, repo, rev, body)  # type: ignore[union-attr]
    return True


def _read_body(handler: _Handler) -> bytes:
    """The request body, plain (``Content-Length``) or chunked (httpx streams a file object that way)."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _authorized(handler: _Handler) -> bool:
    token = handler.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if token in handler.hub.tokens:
        return True
    handler._send_error(401, None, "Invalid credentials in Authorization header" if token else
                        "You must be authenticated to write to this repository")
    return False


def _create_repo(handler: _Handler, body: bytes) -> None:
    payload = json.loads(body or b"{}")
    repo_id = f"{payload.get('organization')}/{payload.get('name')}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", repo_id):
        handler._send_error(400, None, f"invalid repository name {repo_id!r}")
        return
    url = f"{handler.hub.endpoint}/{repo_id}"
    with handler.hub._lock:
        if repo_id in handler.hub.repos:  # the Hub names the repository in its 409 (create_repo reads it)
            message = "You already created this model repo"
            handler._send_json({"error": message, "url": url}, 409, {"X-Error-Message": message})
            return
        handler.hub.add_repo(repo_id, {"main": {".gitattributes": INITIAL_GITATTRIBUTES}})
    handler._send_json({"url": url, "name": repo_id, "id": repo_id})


def _create_branch(handler: _Handler, repo: Repo, branch: str, body: bytes) -> None:
    payload = json.loads(body or b"{}")
    start = payload.get("startingPoint") or "main"
    with handler.hub._lock:
        if branch in repo.branches:
            handler._send_error(409, None, f"Branch {branch} already exists")
            return
        found = next(((c, files) for b, files in repo.branches.items() for c in [repo.commits[b]]
                      if start in (b, c)), None)
        if found is None:
            handler._send_error(404, "RevisionNotFound", f"Invalid rev id: {start}")
            return
        repo.branches[branch] = dict(found[1])
        repo.commits[branch] = found[0]
    handler._send_json({})


def _lfs_mode(path: str, size: int) -> bool:
    return size > 0 and (path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE)


def _preupload(handler: _Handler, repo: Repo, rev: str, body: bytes) -> None:
    payload = json.loads(body or b"{}")
    files = repo.branches.get(rev)
    if files is None:
        handler._send_error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return
    answer = []
    for item in payload.get("files", []):
        lfs = _lfs_mode(item["path"], int(item["size"]))
        current = files.get(item["path"])
        oid = None if current is None else (current.sha256 if lfs else current.git_oid)
        answer.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                       "oid": oid})
    handler._send_json({"files": answer, "commitOid": repo.commits[rev]})


def _lfs_batch(handler: _Handler, body: bytes) -> None:
    payload = json.loads(body or b"{}")
    if "basic" not in payload.get("transfers", ["basic"]):
        handler._send_error(422, None, "this test Hub offers only the basic transfer")
        return
    objects = []
    for item in payload.get("objects", []):
        oid, size = item.get("oid"), item.get("size")
        entry: dict[str, Any] = {"oid": oid, "size": size}
        if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
            entry["error"] = {"code": 422, "message": "oid must be a sha256 and size a byte count"}
        elif oid not in handler.hub.lfs_objects:
            base = handler.hub.endpoint
            entry["authenticated"] = True
            entry["actions"] = {"upload": {"href": f"{base}/lfs-upload/{oid}", "header": {}},
                                "verify": {"href": f"{base}/lfs-verify/{oid}", "header": {}}}
        objects.append(entry)
    handler._send_json({"transfer": "basic", "objects": objects})


def _lfs_upload(handler: _Handler, oid: str, data: bytes) -> None:
    if handler.command != "PUT":
        handler._send_error(405, None, "PUT the object")
        return
    if hashlib.sha256(data).hexdigest() != oid:
        handler._send_error(400, None, f"the uploaded bytes do not have sha256 {oid}")
        return
    with handler.hub._lock:
        handler.hub.lfs_objects[oid] = data
    handler._send_json({})


def _lfs_verify(handler: _Handler, oid: str, body: bytes) -> None:
    payload = json.loads(body or b"{}")
    stored = handler.hub.lfs_objects.get(oid)
    if stored is None or payload.get("size") != len(stored):
        handler._send_error(404, None, f"object {oid} of size {payload.get('size')} was not uploaded")
        return
    handler._send_json({})


def _commit(handler: _Handler, repo: Repo, rev: str, body: bytes) -> None:
    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    header = next((line["value"] for line in lines if line.get("key") == "header"), {})
    with handler.hub._lock:
        files = repo.branches.get(rev)
        if files is None:
            handler._send_error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        if header.get("parentCommit") not in (None, repo.commits[rev]):
            handler._send_error(412, None, "parentCommit is not the head of the branch")
            return
        updated, problem = _apply_operations(handler.hub, dict(files), lines)
        if problem:
            handler._send_error(422, None, problem)
            return
        parent = repo.commits[rev]
        repo.snapshots[parent] = files
        listing = json.dumps(sorted((f.path, f.git_oid) for f in updated.values()))
        commit = hashlib.sha1(f"{repo.repo_id}\0{rev}\0{parent}\0{listing}".encode()).hexdigest()
        repo.branches[rev], repo.commits[rev] = updated, commit
        paths = [line["value"]["path"] for line in lines if line.get("key") != "header"]
        handler.hub.commits_made.append({"repo": repo.repo_id, "branch": rev, "header": header, "paths": paths})
    handler._send_json({"commitUrl": f"{handler.hub.endpoint}/{repo.repo_id}/commit/{commit}", "commitOid": commit,
                        "pullRequestUrl": None, "success": True})


def _apply_operations(hub: HubServer, files: dict[str, ServedFile],
                      lines: list[dict[str, Any]]) -> tuple[dict[str, ServedFile], str | None]:
    import base64

    for line in lines:
        key, value = line.get("key"), line.get("value", {})
        if key == "file":
            files[value["path"]] = make_file(value["path"], base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile":
            data = hub.lfs_objects.get(value.get("oid", ""))
            if data is None:
                return files, f"{value.get('path')}: LFS object {value.get('oid')} was never uploaded"
            files[value["path"]] = make_file(value["path"], data, lfs=True)
        elif key == "deletedFile":
            files.pop(value["path"], None)
        elif key == "deletedFolder":
            prefix = value["path"].rstrip("/") + "/"
            for path in [p for p in files if p.startswith(prefix)]:
                del files[path]
        elif key != "header":
            return files, f"unsupported commit operation {key!r}"
    return files, None


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.hub_server [--port 8765]``: serve the test repositories (miniature copies of the seed
    repositories, see :func:`tests.download_helpers.populate`) until interrupted; the first line printed is the
    ``export HF_ENDPOINT=...`` to paste into the shell that runs gptq-tools (the documentation's examples)."""
    import argparse
    import time

    from .download_helpers import populate_docs

    parser = argparse.ArgumentParser(prog="python -m tests.hub_server", description=main.__doc__)
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port)")
    args = parser.parse_args(argv)
    with HubServer(port=args.port) as server:
        populate_docs(server)
        print(f"export HF_ENDPOINT={server.endpoint}", flush=True)
        print(f"serving {', '.join(sorted(server.repos))}; Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
