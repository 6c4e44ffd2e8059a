"""Progress bars: tqdm, off globally on request and automatically when stderr is not a terminal."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm as _tqdm

from .constants import progress_disabled

_FORCED: bool | None = None


def set_progress(enabled: bool | None) -> None:
    """Force progress bars on (True) or off (False); None restores the automatic choice."""
    global _FORCED
    _FORCED = enabled


def progress_enabled() -> bool:
    """Whether a new bar would be shown."""
    if _FORCED is not None:
        return _FORCED
    if progress_disabled():
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def tqdm(*args: Any, disable: bool | None = None, **kwargs: Any) -> _tqdm:
    """A tqdm bar that honours :func:`progress_enabled` unless ``disable`` is given explicitly."""
    if disable is None:
        disable = not progress_enabled()
    return _tqdm(*args, disable=disable, **kwargs)


def byte_bar(total: int | None, desc: str, *, enabled: bool | None = None) -> _tqdm:
    """A bar counting bytes with rate and ETA; ``enabled=None`` follows :func:`progress_enabled`."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if enabled is None else not enabled, dynamic_ncols=True, leave=False)
