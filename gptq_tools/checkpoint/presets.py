"""Presets (known repositories: branches, file names, published hashes, model configs, memory plans), and
the one grammar every command uses to name a model: ``PRESET[:BRANCH]`` or ``NAMESPACE/NAME[:BRANCH]``.

Presets are JSON files kept in the repository's top-level ``configs/presets/`` and shipped inside the wheel as
``gptq_tools/configs/presets/`` (``setup.py`` maps them; read with :mod:`importlib.resources`);
``GPTQ_TOOLS_CONFIGS=DIR`` replaces them with ``DIR/presets/``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import configs_dir
from ..errors import PathNotFoundError, UsageError
from ..files.paths import looks_like_path, require_folder

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

#: A Hub repository id: ``NAME`` or ``NAMESPACE/NAME`` (letters, digits, ``-_.``).
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


@dataclass(frozen=True)
class Preset:
    """One preset, as read from ``NAME.json`` in :func:`presets_dir`."""

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


def presets_dir() -> Traversable:
    """The folder of preset files: the package's own, or ``GPTQ_TOOLS_CONFIGS/presets``."""
    override = configs_dir()
    if override is not None:
        return override / "presets"
    installed = resources.files("gptq_tools") / "configs" / "presets"  # a wheel carries them here
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "configs" / "presets"  # a checkout: the top-level folder


def _preset_files() -> list[Traversable]:
    folder = presets_dir()
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.name.endswith(".json") and p.is_file()), key=lambda p: p.name)


def list_presets() -> list[str]:
    """Names of all presets, sorted."""
    return [p.name[:-len(".json")] for p in _preset_files()]


def load_preset(name: str) -> Preset:
    """Load the preset called ``name`` (file stem), or the one whose ``repo_id`` is ``name``.

    Raises:
        UsageError: no such preset (the message lists the known ones).
    """
    files = _preset_files()
    wanted = name.lower()  # preset names and repository ids are matched without regard to case
    path = next((p for p in files if p.name.lower() == f"{wanted}.json"), None)
    if path is None:
        path = next((p for p in files if str(_read(p).get("repo_id", "")).lower() == wanted), None)
    if path is None:
        raise UsageError(f"unknown preset {name!r}; known presets: {', '.join(list_presets()) or 'none'} "
                         f"(in {presets_dir()})")
    data = _read(path)
    known = set(Preset.__dataclass_fields__)
    return Preset(**{key: value for key, value in data.items() if key in known})


def find_preset(name: str) -> Preset | None:
    """Like :func:`load_preset`, but None when there is no such preset."""
    try:
        return load_preset(name)
    except UsageError:
        return None


def _read(path: Traversable) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: preset is unreadable ({exc}); fix or remove the file") from None


# ------------------------------------------------------------------------------------ model names
@dataclass(frozen=True)
class ModelSpec:
    """A model named as ``PRESET[:BRANCH]`` or ``NAMESPACE/NAME[:BRANCH]``, before anything is looked up."""

    repo_id: str
    revision: str  # the branch asked for, else the preset's default branch, else "main"
    preset: Preset | None = None

    @property
    def default_branch(self) -> str:
        return self.preset.default_branch if self.preset is not None else "main"

    def local_dir(self) -> Path:
        """The folder ``gptq-tools download`` writes this model into by default: ``./NAME[-BRANCH]``."""
        folder = self.repo_id.rstrip("/").rsplit("/", 1)[-1]
        return Path(folder if self.revision == self.default_branch else f"{folder}-{self.revision}")


#: A model page on the Hub: ``https://huggingface.co/ORG/NAME``, optionally ``/tree/BRANCH`` (or ``/blob/...``).
_HUB_URL_RE = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?!datasets/|spaces/)"
                         r"(?P<repo>[^/\s:]+(?:/[^/\s:]+)?)(?:/(?:tree|blob|resolve)/(?P<branch>[^/\s]+).*)?/?$")


def strip_hub_url(text: str) -> str:
    """``https://huggingface.co/ORG/NAME[/tree/BRANCH]`` as ``ORG/NAME[:BRANCH]``; any other text unchanged."""
    match = _HUB_URL_RE.match(text.strip())
    if match is None:
        return text
    return match["repo"] + (f":{match['branch']}" if match["branch"] else "")


def parse_model_spec(text: str, *, revision: str | None = None) -> ModelSpec:
    """Turn ``PRESET[:BRANCH]`` or ``NAMESPACE/NAME[:BRANCH]`` (plus a separate ``--revision``/``--branch``)
    into a :class:`ModelSpec`; every command that takes a model by name goes through here.

    Raises:
        UsageError: the text is neither a preset nor a repository id, or ``:BRANCH`` and ``revision`` disagree.
    """
    text = strip_hub_url(text)
    name, _, branch = text.strip().partition(":")
    if not name or text.count(":") > 1:
        raise UsageError(f"{text!r} is not a repository; write it as NAMESPACE/NAME[:BRANCH] or a preset name "
                         f"({', '.join(list_presets()) or 'none known'})")
    if branch and revision and branch != revision:
        raise UsageError(f"{text!r} names branch {branch!r} but --revision/--branch is {revision!r}; give only one")
    preset = find_preset(name)
    repo_id = preset.repo_id if preset is not None else name
    if not REPO_ID_RE.match(repo_id):
        raise UsageError(f"{name!r} is neither a repository id (NAMESPACE/NAME) nor a preset "
                         f"({', '.join(list_presets()) or 'none known'}); write it as NAMESPACE/NAME[:BRANCH]")
    chosen = branch or revision or (preset.default_branch if preset is not None else "main")
    return ModelSpec(repo_id=repo_id, revision=chosen, preset=preset)


@dataclass(frozen=True)
class ModelSource:
    """What a model argument named: a local checkpoint folder, a name (preset or repository), or both
    (a name whose download folder exists)."""

    folder: Path | None
    spec: ModelSpec | None


def resolve_model(source: str | os.PathLike[str], *, revision: str | None = None,
                  need_folder: bool) -> ModelSource:
    """Resolve a model argument: an existing folder, else ``PRESET[:BRANCH]`` / ``NAMESPACE/NAME[:BRANCH]``.

    A name stands for the folder ``gptq-tools download NAME`` writes (:meth:`ModelSpec.local_dir`); a preset
    needs no folder when ``need_folder`` is False (its model config is enough to plan). Text that can only
    be a path (``/x``, ``./x``, ``x.safetensors``) and ``os.PathLike`` objects are always paths.

    Raises:
        PathNotFoundError: a path that does not exist, or a name whose download folder is missing.
        NotAFolderError: a path to a file (the checkpoint folder is needed).
        UsageError: a name that is neither a preset nor a repository id; ``:BRANCH`` disagrees with ``revision``.
    """
    text = strip_hub_url(os.fspath(source)) if isinstance(source, str) else os.fspath(source)
    path = Path(text).expanduser()
    if not isinstance(source, str) or path.exists() or looks_like_path(text):
        return ModelSource(require_folder(path, what="the checkpoint folder (the one holding config.json) or a "
                                                     "preset name"), None)
    spec = parse_model_spec(text, revision=revision)
    local = spec.local_dir()
    if spec.preset is not None and not need_folder:
        return ModelSource(None, spec)
    if local.is_dir():
        return ModelSource(local, spec)
    if spec.preset is None and "/" not in spec.repo_id:
        raise UsageError(f"unknown preset {spec.repo_id!r} and no folder of that name (known presets: "
                         f"{', '.join(list_presets()) or 'none'}); give a checkpoint folder, a preset or a "
                         f"downloaded repository (NAMESPACE/NAME[:BRANCH])")
    raise PathNotFoundError(f"{text}: no folder ./{local} (where `gptq-tools download {text}` puts it); "
                            f"download it first, or give the checkpoint folder")
