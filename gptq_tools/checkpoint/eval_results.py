"""Quality results kept beside a checkpoint: ``eval.json``, written by ``gptq-tools eval --save`` and shown
by ``gptq-tools publish`` in the model card.

The file holds ``{"results": [...]}``, one object per measurement (the fields of ``eval``'s ``--json``
output); a new measurement of the same data file, window length, token cap and reference replaces the old
one, others are kept. The file is written atomically. Read back, it is untrusted data (it travels with a
checkpoint): only results whose fields have the expected types are returned, others are skipped with a
warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..files.fileio import write_bytes_atomic

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
#: The fields that identify one measurement: a result with the same ones replaces the earlier one.
_KEY_FIELDS = ("data", "seqlen", "tokens", "reference")
_NUMBERS = ("perplexity", "reference_perplexity", "kl_divergence", "seconds")
_INTEGERS = ("tokens", "windows", "seqlen")
#: Larger than this is not an eval file but something else under its name.
_MAX_BYTES = 1 << 20


def save_eval_result(folder: str | os.PathLike[str], result: dict[str, Any]) -> Path:
    """Add ``result`` (an ``EvalReport.to_dict()``) to ``folder/eval.json``, replacing the result of the same
    measurement; returns the file's path.

    Raises:
        CheckpointError: an existing ``eval.json`` cannot be read as one (it is left as it is).
    """
    path = Path(folder) / EVAL_FILE
    kept = [r for r in _read_raw(path) if any(r.get(k) != result.get(k) for k in _KEY_FIELDS)] \
        if path.exists() else []
    data = {"results": [*kept, result]}
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
    logger.info("%s: saved the result (%d in the file)", path, len(data["results"]))
    return path


def read_eval_results(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The well-formed results in ``folder/eval.json`` (none when there is no file).

    Raises:
        CheckpointError: the file is not JSON of the expected shape.
    """
    path = Path(folder) / EVAL_FILE
    if not path.is_file():
        return []
    results = []
    for number, result in enumerate(_read_raw(path), 1):
        problem = _problem(result)
        if problem:
            logger.warning("%s: result %d skipped: %s", path, number, problem)
        else:
            results.append(result)
    return results


def _read_raw(path: Path) -> list[dict[str, Any]]:
    try:
        if path.stat().st_size > _MAX_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes is too large for an eval file; remove it "
                                  f"or rerun `gptq-tools eval --save`")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read it as JSON ({exc}); remove it or rerun "
                              f"`gptq-tools eval --save`") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise CheckpointError(f"{path}: expected {{\"results\": [...]}} of objects; remove it or rerun "
                              f"`gptq-tools eval --save`")
    return results


def _problem(result: dict[str, Any]) -> str | None:
    """Why ``result`` is not a usable measurement, or None."""
    for name in ("model", "data"):
        if not isinstance(result.get(name), str):
            return f"{name} is not text"
    for name in _INTEGERS:
        if type(result.get(name)) is not int or result[name] < 0:
            return f"{name} is not a count"
    for name in _NUMBERS:
        value = result.get(name)
        if name == "perplexity" or value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"{name} is not a finite number"
    if result.get("reference") is not None and not isinstance(result["reference"], str):
        return "reference is not text"
    return None
