"""What a local folder already holds: verified files, partial downloads, foreign files.

gptq-tools keeps its bookkeeping in ``<local_dir>/.cache/huggingface/gptq-tools/download/``, beside
huggingface_hub's own ``local_dir`` metadata: ``HfApi.upload_folder`` and ``hf upload`` never publish
``.cache/huggingface/`` (their default ignore patterns), and a ``.gitignore`` there keeps it out of git.
(Anywhere else under ``.cache/`` would make ``upload_folder`` fail: the Hub refuses ``.cache`` folders.)
Folders downloaded by older versions kept it in ``.gptq-tools/download/``; :meth:`LocalState.migrate`
moves it on the next run.

``incomplete/<hash>-<path id>.incomplete`` holds the bytes of an unfinished file: named by the expected
hash, so a partial file of another version is never resumed, and by the file's path, so two files with the
same bytes never share one. ``verified.json`` remembers which final files were checked (size, mtime,
hash), so a re-run does not re-hash 100 GB. A file at a final name that is not remembered is hashed
before it is trusted; one whose bytes differ from the repository's is foreign and is never overwritten
silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from ..constants import IO_CHUNK_BYTES
from ..errors import UnsafePathError
from ..files.fileio import ensure_folder, fsync_dir, lstat_regular, replace, rmtree, unlink, write_bytes_atomic
from ..files.pipeline import CallbackConsumer, Consumer, Segment, WholeHasher, run_pipeline

logger = logging.getLogger(__name__)

#: Where huggingface_hub keeps ``local_dir`` metadata, which upload tools skip.
HF_METADATA_DIR = Path(".cache") / "huggingface"
STATE_DIR = HF_METADATA_DIR / "gptq-tools" / "download"
#: Where versions before 0.2 kept the state (inside what ``upload_folder`` publishes).
LEGACY_STATE_DIR = Path(".gptq-tools") / "download"


def new_hasher(algorithm: str) -> hashlib._Hash:
    """A hasher for ``"sha256"`` or ``"git-sha1"`` (the caller feeds the git blob header first)."""
    return hashlib.sha256() if algorithm == "sha256" else hashlib.sha1()


def start_hasher(algorithm: str, size: int) -> hashlib._Hash:
    """A hasher ready for a file's content: git blob ids hash ``b"blob <size>\\0"`` before the bytes."""
    hasher = new_hasher(algorithm)
    if algorithm == "git-sha1":
        hasher.update(b"blob %d\0" % size)
    return hasher


def feed_file(hasher: hashlib._Hash, path: Path, *, length: int | None = None,
              on_bytes: Callable[[int], None] | None = None) -> int:
    """Feed the first ``length`` bytes of ``path`` (all when None) into ``hasher``; returns the count."""
    size = path.stat().st_size if length is None else length
    if size > 0:
        consumers: list[Consumer] = [WholeHasher(hasher)]
        if on_bytes is not None:
            consumers.append(CallbackConsumer(on_bytes))
        run_pipeline([Segment(path, 0, size)], consumers, chunk_bytes=IO_CHUNK_BYTES)
    return size


def _regular_or_removed(path: Path) -> bool:
    """Whether ``path`` is a regular file; a link (or other non-file) there is removed, never followed.

    Partial files' names are computable from the public listing: a link found at one was planted or
    copied in, and resuming through it would overwrite its target with the repository's bytes.
    """
    try:
        return lstat_regular(path) is not None
    except UnsafePathError:
        if os.path.isdir(path) and not os.path.islink(path):
            raise
        logger.warning("%s: not a regular file where a partial download belongs; removed it (without following "
                       "it) and that file starts from zero", path)
        unlink(path, missing_ok=True)
        return False


class LocalState:
    """Bookkeeping of one local folder (thread-safe)."""

    def __init__(self, local_dir: Path) -> None:
        self.local_dir = local_dir
        self.folder = local_dir / STATE_DIR
        self._lock = threading.Lock()
        self._verified: dict[str, dict[str, object]] = self._load()

    def _load(self) -> dict[str, dict[str, object]]:
        path = self.folder / "verified.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {name: record for name, record in data.items() if isinstance(record, dict)}

    def migrate(self) -> None:
        """Move state left in :data:`LEGACY_STATE_DIR` by an older version to :data:`STATE_DIR`.

        Each step leaves a state a rerun can finish: the folder is moved in one rename, then the empty
        legacy folder is removed. When both exist (a rerun killed in between), the legacy one is stale.
        """
        legacy = self.local_dir / LEGACY_STATE_DIR
        if legacy.is_dir():
            if not self.folder.exists():
                self.folder.parent.mkdir(parents=True, exist_ok=True)
                replace(legacy, self.folder)
                fsync_dir(self.folder.parent)
                logger.info("moved download state from %s to %s (upload tools skip it there)", legacy, self.folder)
            else:
                rmtree(legacy)
        if legacy.parent.is_dir() and not any(legacy.parent.iterdir()):
            rmtree(legacy.parent)
        self._verified = self._load()

    def prepare(self) -> None:
        """Create the state folder with a ``.gitignore`` (as huggingface_hub does for its own metadata)."""
        ensure_folder(self.folder, root=self.local_dir)  # a linked-in state folder would write outside
        gitignore = self.local_dir / HF_METADATA_DIR / ".gitignore"
        if not gitignore.exists():
            write_bytes_atomic(gitignore, b"*\n")

    def incomplete_path(self, path: str, checksum: tuple[str, str]) -> Path:
        """Where the partial bytes of the file at ``path`` with ``checksum`` live.

        ``checksum`` must already be checked (hex only, see :func:`gptq_tools.hub.remote.checked_files`);
        the path enters only as its hash, so two files with the same bytes get two partial files.
        """
        path_id = hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]
        return self.folder / "incomplete" / f"{checksum[1]}-{path_id}.incomplete"

    def remove_incomplete(self) -> None:
        """After a complete download: remove the ``incomplete/`` folder once nothing is left in it.

        Partial files of files this run did not select (``--include``) stay for the run that wants them.
        """
        folder = self.folder / "incomplete"
        if folder.is_dir() and not any(folder.iterdir()):
            rmtree(folder)

    def verified_record(self, rel_path: str) -> dict[str, object] | None:
        """What was remembered about ``rel_path`` when it was last verified (None if never)."""
        return self._verified.get(rel_path)

    def is_verified(self, rel_path: str, checksum: tuple[str, str]) -> bool:
        """Whether ``rel_path`` was verified as ``checksum`` and has not changed since (size and mtime)."""
        record = self._verified.get(rel_path)
        path = self.local_dir / rel_path
        if record is None or record.get("hash") != checksum[1] or not path.is_file():
            return False
        stat = path.stat()
        return record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns

    def mark_verified(self, rel_path: str, checksum: tuple[str, str]) -> None:
        """Remember that ``rel_path`` holds the bytes of ``checksum`` (written atomically)."""
        stat = (self.local_dir / rel_path).stat()
        with self._lock:
            self._verified[rel_path] = {"hash": checksum[1], "algorithm": checksum[0], "size": stat.st_size,
                                        "mtime_ns": stat.st_mtime_ns}
            self.prepare()
            write_bytes_atomic(self.folder / "verified.json",
                               json.dumps(self._verified, indent=1, sort_keys=True).encode())

    def save_listing(self, revision: str, listing: dict[str, object]) -> None:
        """Remember a resolved commit and its files under ``revision`` (read back offline)."""
        with self._lock:
            path = self.folder / "resolved.json"
            try:
                known = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                known = {}
            known = known if isinstance(known, dict) else {}
            known[revision] = listing
            known[str(listing["commit"])] = listing
            self.prepare()
            write_bytes_atomic(path, json.dumps(known, indent=1, sort_keys=True).encode())

    def load_listing(self, revision: str) -> dict[str, object] | None:
        """The listing saved for ``revision`` (a branch, tag or commit), or None."""
        try:
            known = json.loads((self.folder / "resolved.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        listing = known.get(revision) if isinstance(known, dict) else None
        return listing if isinstance(listing, dict) else None

    def check_existing(self, rel_path: str, checksum: tuple[str, str], size: int) -> bool | None:
        """Classify the file at ``rel_path``: None absent, True the expected bytes, False foreign.

        A file not remembered as verified is hashed (and remembered when it matches).
        """
        path = self.local_dir / rel_path
        if not path.is_file():
            return None
        if self.is_verified(rel_path, checksum):
            return True
        if path.stat().st_size != size:
            return False
        logger.info("%s: already present, checking its %s before trusting it", path, checksum[0])
        hasher = start_hasher(checksum[0], size)
        feed_file(hasher, path)
        if hasher.hexdigest() != checksum[1]:
            return False
        self.mark_verified(rel_path, checksum)
        return True

    def partial_bytes(self, rel_path: str, checksum: tuple[str, str], size: int) -> int:
        """Bytes of an unfinished download on disk (0 when none, or when it is longer than the file)."""
        path = self.incomplete_path(rel_path, checksum)
        older = path.parent / f"{checksum[1]}.incomplete"  # named by hash only, before 0.2
        if _regular_or_removed(older) and not os.path.lexists(path):
            replace(older, path)
        if not _regular_or_removed(path):
            return 0
        have = path.stat().st_size
        if have > size:
            logger.warning("%s: longer than the file it belongs to; starting that file again", path)
            unlink(path, missing_ok=True)
            return 0
        return have
