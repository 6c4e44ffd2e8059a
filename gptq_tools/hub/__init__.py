"""Branch-aware Hub download (imports checkpoint, files and ground): verified, resumable, parallel, split
parts joined on arrival, and ``verify --remote``."""

from __future__ import annotations

from .downloader import DownloadResult, JoinedFile, download, plan_download
from .plan import DownloadPlan, PlannedFile, PlannedJoin
from .remote import RemoteFile, RepoSpec, ResolvedRepo, parse_spec, resolve_repo
from .transfer import FileTask, TransferOptions, fetch_files

__all__ = [
    "DownloadPlan", "DownloadResult", "FileTask", "JoinedFile", "PlannedFile", "PlannedJoin", "RemoteFile",
    "RepoSpec", "ResolvedRepo", "TransferOptions", "download", "fetch_files", "parse_spec", "plan_download",
    "resolve_repo",
]
