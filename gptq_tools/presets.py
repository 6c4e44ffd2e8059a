"""Presets: known repositories (branches, file names, published hashes, model configs, memory plans).

Presets are JSON files in ``configs/presets/`` (``GPTQ_TOOLS_CONFIGS`` points elsewhere). Every command
that takes a repository or a model path also takes a preset name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .constants import configs_dir
from .errors import UsageError


@dataclass(frozen=True)
class Preset:
    """One preset, as read from ``configs/presets/NAME.json``."""

    name: str
    repo_id: str
    description: str = ""
    default_branch: str = "main"
    branches: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    memory_plans: dict[str, dict[str, str]] = field(default_factory=dict)
    prompt_template: str = ""
    tokenizer: dict[str, Any] = field(default_factory=dict)

    def branch_files(self, branch: str | None = None) -> dict[str, dict[str, Any]]:
        """The files of ``branch`` (default branch if None): ``{name: {"sha256": ..., "parts": [...]}}``."""
        branch = branch or self.default_branch
        if branch not in self.branches:
            raise UsageError(f"preset {self.name!r} has no branch {branch!r}; known: {', '.join(self.branches)}")
        return dict(self.branches[branch].get("files", {}))

    def expected_sha256(self, filename: str, branch: str | None = None) -> str | None:
        """The published SHA256 of ``filename`` (a whole file, possibly published as parts)."""
        return self.branch_files(branch).get(filename, {}).get("sha256")


def presets_dir() -> Path:
    return configs_dir() / "presets"


def list_presets() -> list[str]:
    """Names of all presets, sorted."""
    folder = presets_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def load_preset(name: str) -> Preset:
    """Load the preset called ``name`` (file stem), or the one whose ``repo_id`` is ``name``.

    Raises:
        UsageError: no such preset (the message lists the known ones).
    """
    folder = presets_dir()
    path = folder / f"{name}.json"
    if not path.is_file():
        for candidate in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            if _read(candidate).get("repo_id") == name:
                path = candidate
                break
        else:
            raise UsageError(f"unknown preset {name!r}; known presets: {', '.join(list_presets()) or 'none'} "
                             f"(in {folder})")
    data = _read(path)
    known = set(Preset.__dataclass_fields__)
    return Preset(**{key: value for key, value in data.items() if key in known})


def find_preset(name: str) -> Preset | None:
    """Like :func:`load_preset`, but None when there is no such preset."""
    try:
        return load_preset(name)
    except UsageError:
        return None


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: preset is unreadable ({exc}); fix or remove the file") from None
