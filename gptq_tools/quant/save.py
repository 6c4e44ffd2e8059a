"""The checkpoint writer: AutoGPTQ format tensors, sharded with an index (or one file), configs,
tokenizer, ``SHA256SUMS``; everything goes into a staging folder next to the output that is renamed
to the output only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InsufficientSpaceError, OutputExistsError
from ..fileio import atomic_path, fsync_dir, raise_if_no_space, sha256_file, write_bytes_atomic
from ..split import plan_shards, shard_names

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "SHA256SUMS"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")


@dataclass(frozen=True)
class TensorRef:
    """A tensor to write: its checkpoint name, size in bytes, and how to load it."""

    name: str
    nbytes: int
    load: Callable[[], torch.Tensor]


SINGLE_FILE_NAME = "model.safetensors"


def single_file_name(bits: int, group_size: int, *, autogptq: bool = False) -> str:
    """The single-file checkpoint's name: ``model.safetensors``, what transformers and vLLM look for.

    With ``autogptq``, AutoGPTQ's name ``gptq_model-4bit-128g.safetensors`` (group -1 gives ``--1g``),
    as on TheBloke's repositories; transformers does not find that one. Either way the checkpoint's
    ``model_file_base_name`` names the file, which is how AutoGPTQ and GPTQModel find it.
    """
    return f"gptq_model-{bits}bit-{group_size}g.safetensors" if autogptq else SINGLE_FILE_NAME


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    try:
        with atomic_path(path, force=True) as temp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(temp), metadata={"format": "pt"})
            with open(temp, "rb+") as handle:
                os.fsync(handle.fileno())
    except OSError as exc:
        raise_if_no_space(exc, path)
        raise


def write_tensors(refs: Sequence[TensorRef], folder: Path, *, max_shard_size: int,
                  single_file: str | None = None) -> list[str]:
    """Write ``refs`` into ``folder`` as one file (``single_file``) or HF-style shards plus an index.

    Returns:
        The file names written (tensor files and index).

    Raises:
        InsufficientSpaceError: the disk filled up.
    """
    if single_file:
        _save_safetensors({ref.name: ref.load() for ref in refs}, folder / single_file)
        return [single_file]
    by_name = {ref.name: ref for ref in refs}
    shards = [[by_name[n] for n in names] for names in plan_shards([(r.name, r.nbytes) for r in refs], max_shard_size)]
    weight_map: dict[str, str] = {}
    names = []
    for name, shard in zip(shard_names(len(shards)), shards):
        _save_safetensors({ref.name: ref.load() for ref in shard}, folder / name)
        weight_map.update({ref.name: name for ref in shard})
        names.append(name)
        logger.debug("wrote %s (%d tensors)", name, len(shard))
    index = {"metadata": {"total_size": sum(ref.nbytes for ref in refs)}, "weight_map": weight_map}
    write_bytes_atomic(folder / INDEX_NAME, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    return names + [INDEX_NAME]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def copy_tokenizer(source: Path, folder: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist in ``source``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
            copied.append(name)
    return copied


def write_checksums(folder: Path) -> Path:
    """``SHA256SUMS`` (sha256sum format) over every file in ``folder`` except itself, sorted by name."""
    from ..manifest import write_manifest

    entries = {path.name: sha256_file(path) for path in sorted(folder.iterdir())
               if path.is_file() and path.name != MANIFEST_NAME}
    write_manifest(folder / MANIFEST_NAME, entries, merge=False)
    return folder / MANIFEST_NAME


def publish(staging: Path, output: Path) -> None:
    """Rename the finished ``staging`` folder to ``output`` (which may exist only as an empty folder).

    Raises:
        OutputExistsError: ``output`` appeared and is not empty.
    """
    mode = 0o666 & ~_umask()
    for path in staging.iterdir():
        path.chmod(mode)
    if output.exists():
        if any(output.iterdir()):
            raise OutputExistsError(f"{output}: output folder is not empty; choose another or empty it "
                                    f"(the finished checkpoint is kept in {staging})")
        output.rmdir()
    os.replace(staging, output)
    fsync_dir(output.parent)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def check_output_folder(output: Path) -> None:
    """Refuse an output folder that exists and is not empty, or is a file.

    Raises:
        OutputExistsError: it is not empty (or is a file).
    """
    if output.is_file() or (output.is_dir() and any(output.iterdir())):
        raise OutputExistsError(f"{output}: output folder is not empty; choose another or empty it")


__all__ = [
    "InsufficientSpaceError",
    "TensorRef",
    "check_output_folder",
    "copy_tokenizer",
    "publish",
    "single_file_name",
    "write_json",
    "write_checksums",
    "write_tensors",
]
