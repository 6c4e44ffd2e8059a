"""``gptq-tools presets``: the known models (name, repository, branches and their planned weight sizes)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..units import format_size


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``presets`` sub-command."""
    parser = subparsers.add_parser(
        "presets", help="list the presets (names every command accepts instead of a repository)",
        description="List the presets: name, Hub repository, branches with their quantization settings, and the "
                    "weight size each branch plans to (from the preset's model config; nothing is downloaded). "
                    "Preset names are matched without regard to case.")
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.set_defaults(func=run_presets)


def preset_rows() -> list[dict[str, Any]]:
    """One dict per preset: ``name, repo_id, description, default_branch, branches: [{name, bits, group_size,
    weight_bytes}]`` (``weight_bytes`` None when the preset has no model config to size)."""
    from ..checkpoint.presets import list_presets, load_preset
    from ..runtime.plan import PlanOptions, load_layout

    rows = []
    for name in list_presets():
        preset = load_preset(name)
        branches = []
        for branch, info in preset.branches.items():
            settings = info.get("quantize_config") or {}
            size = None
            if preset.model_config:
                layout, _ = load_layout(f"{name}:{branch}", options=PlanOptions())
                size = layout.total_weight_bytes
            branches.append({"name": branch, "bits": settings.get("bits"), "group_size": settings.get("group_size"),
                             "quantized": bool(settings), "weight_bytes": size})
        rows.append({"name": preset.name, "repo_id": preset.repo_id, "description": preset.description,
                     "default_branch": preset.default_branch, "branches": branches})
    return rows


def run_presets(args: argparse.Namespace) -> int:
    rows = preset_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}  {row['repo_id']}  {row['description']}")
        for branch in row["branches"]:
            default = " (default)" if branch["name"] == row["default_branch"] else ""
            if branch["quantized"]:
                what = f"{branch['bits']}-bit, group size {branch['group_size']}"
            else:
                what = "not quantized: planned as 4-bit group 128 after `gptq-tools quantize`"
            size = "" if branch["weight_bytes"] is None else f", {format_size(branch['weight_bytes'])} of weights"
            print(f"  :{branch['name']}{default}  {what}{size}")
    return 0
