"""Typed errors for gptq-tools.

Every error the library raises on purpose derives from :class:`GptqToolsError` and also from the
builtin exception that matches it, so callers can catch either (``except ValueError`` keeps working).
The CLI turns these into one line on stderr and a non-zero exit; anything else keeps its traceback.
Messages say what failed, where (file, part, tensor, byte offset) and what to do next.
"""

from __future__ import annotations


class GptqToolsError(Exception):
    """Base class of every error gptq-tools raises on purpose."""

    exit_code: int = 1


class UsageError(GptqToolsError, ValueError):
    """The arguments given cannot work together (bad option value, unknown preset, ...)."""

    exit_code = 2


class ChecksumMismatchError(GptqToolsError, ValueError):
    """A file's SHA256 differs from the expected one."""


class ManifestError(GptqToolsError, ValueError):
    """A checksum manifest (sha256sum format) cannot be parsed or names an unsafe path."""


class PartSetError(GptqToolsError, ValueError):
    """A set of split parts is incomplete, ambiguous or contains a stray file."""


class OutputExistsError(GptqToolsError, FileExistsError):
    """The output file or folder already exists and ``force`` was not given."""


class OutputNotWritableError(GptqToolsError, PermissionError):
    """The output's folder is read-only or not writable."""


class PathNotFoundError(GptqToolsError, FileNotFoundError):
    """A file or folder given on the command line does not exist."""


class NotAFileError(GptqToolsError, IsADirectoryError):
    """A folder was given where a file is needed."""


class NotAFolderError(GptqToolsError, NotADirectoryError):
    """A file was given where a folder (a checkpoint folder) is needed."""


class InsufficientSpaceError(GptqToolsError, OSError):
    """Not enough free disk space (or the disk filled up while writing)."""


class LfsPointerError(GptqToolsError, ValueError):
    """A Git LFS pointer file sits where the real data should be."""


class SafetensorsFormatError(GptqToolsError, ValueError):
    """A safetensors file breaks one of the format's rules."""


class NotRegularFileError(GptqToolsError, OSError):
    """A FIFO, device, socket or folder was given where a regular file must be read."""


class CheckpointError(GptqToolsError, ValueError):
    """A GPTQ checkpoint is inconsistent (config vs tensors, missing shards, ...)."""


class UnsupportedArchitectureError(GptqToolsError, ValueError):
    """The model's architecture is not in gptq-tools' architecture table."""


class CalibrationError(GptqToolsError, ValueError):
    """Calibration data is missing, empty, too short or in an unreadable format."""


class QuantizationError(GptqToolsError, RuntimeError):
    """The quantizer cannot go on (bad weights, bad settings, interrupted state)."""


class HubError(GptqToolsError, OSError):
    """The Hub (or a Hub-compatible server) refused or failed a request."""


class RepoNotFoundError(HubError):
    """The repository does not exist on the Hub (or is private and no valid token was sent)."""


class RevisionNotFoundError(HubError):
    """The branch, tag or commit does not exist in the repository."""


class HubAuthError(HubError, PermissionError):
    """The repository is gated or private and the request was not authorised (HTTP 401/403)."""


class IncompleteDownloadError(GptqToolsError, OSError):
    """A download ended before all its bytes arrived."""


class PlacementError(GptqToolsError, ValueError):
    """A model does not fit the given devices and memory caps."""


class UnsafeCheckpointError(GptqToolsError, ValueError):
    """Loading would require unpickling that was not explicitly allowed, or code from the repository (never run)."""


class UnsafeNameError(GptqToolsError, ValueError):
    """A name from outside (Hub listing, part name, manifest line) would not stay inside its folder."""


class DistributedError(GptqToolsError, RuntimeError):
    """A distributed quantization run lost a rank (died, hung, or stopped with an error)."""


class UnsafePathError(GptqToolsError, OSError):
    """A path the tool writes through holds a symlink or something else than expected (planted, or left over)."""
