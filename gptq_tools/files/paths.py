"""Paths the user gave: say plainly when one is missing, or a folder where a file is needed (or the reverse).

Without these checks the first thing that fails is some later step, whose message is about something
else ("no tokenizer files", "already fits in one part", ".: no config.json").
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import NotAFileError, NotAFolderError, PathNotFoundError


def require_file(path: str | os.PathLike[str], *, what: str = "file") -> Path:
    """``path`` as a :class:`~pathlib.Path`, once it is known to be an existing file (not a folder).

    Args:
        path: the path the user gave.
        what: what the command needs there (``"the file to split"``), used in the messages.

    Raises:
        PathNotFoundError: nothing is at ``path``.
        NotAFileError: ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise NotAFileError(f"{path} is a folder; give {what}, not a folder")
    if not path.exists():
        raise PathNotFoundError(f"{path}: no such file; give {what}")
    return path


def require_folder(path: str | os.PathLike[str], *, what: str = "the checkpoint folder (the one holding "
                   "config.json)") -> Path:
    """``path`` as a :class:`~pathlib.Path`, once it is known to be an existing folder (not a file).

    Args:
        path: the path the user gave.
        what: what the command needs there, used in the messages.

    Raises:
        PathNotFoundError: nothing is at ``path``.
        NotAFolderError: ``path`` is a file.
    """
    path = Path(path)
    if path.is_file() or (path.exists() and not path.is_dir()):
        where = f" ({path.parent})" if str(path.parent) not in ("", ".") else ""
        raise NotAFolderError(f"{path} is a file; give {what}, e.g. the folder it is in{where}")
    if not path.exists():
        raise PathNotFoundError(f"{path}: no such folder; give {what}")
    return path


def looks_like_path(text: str) -> bool:
    """Whether ``text`` can only be meant as a path (``/x``, ``./x``, ``~/x``, ``a/b/c``, ``x.safetensors``),
    never as a model name (``PRESET[:BRANCH]``, ``NAMESPACE/NAME[:BRANCH]``)."""
    if "://" in text:  # a URL (https://huggingface.co/ORG/NAME) names a repository, never a local path
        return False
    if text in (".", "..") or text.startswith(("/", "./", "../", "~", "\\")):
        return True
    return text.count("/") > 1 or Path(text).suffix.lower() in (".safetensors", ".json", ".bin", ".pt", ".pth")
