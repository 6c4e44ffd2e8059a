"""The checkpoint writer: AutoGPTQ format tensors, sharded with an index (or one file), configs,
tokenizer, ``SHA256SUMS``; everything goes into a staging folder next to the output that is renamed
to the output only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InsufficientSpaceError, OutputExistsError, QuantizationError
from ..files.fileio import (
    atomic_path,
    fsync_dir,
    open_nofollow,
    raise_if_no_space,
    replace,
    rmtree,
    write_bytes_atomic,
)
from ..files.pipeline import sha256_file
from ..files.safetensors_format import build_header
from ..files.split import plan_shards, shard_names

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "SHA256SUMS"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")


@dataclass(frozen=True)
class TensorRef:
    """A tensor to write: its checkpoint name, size in bytes, how to load it, and (when known without
    loading it) its safetensors dtype name and shape."""

    name: str
    nbytes: int
    load: Callable[[], torch.Tensor]
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


#: safetensors dtype names of the torch dtypes a checkpoint holds.
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                       torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32",
                       torch.int64: "I64", torch.bool: "BOOL"}


SINGLE_FILE_NAME = "model.safetensors"


def single_file_name(bits: int, group_size: int, *, autogptq: bool = False) -> str:
    """The single-file checkpoint's name: ``model.safetensors``, what transformers and vLLM look for.

    With ``autogptq``, AutoGPTQ's name ``gptq_model-4bit-128g.safetensors`` (group -1 gives ``--1g``),
    as on TheBloke's repositories; transformers does not find that one. Either way the checkpoint's
    ``model_file_base_name`` names the file, which is how AutoGPTQ and GPTQModel find it.
    """
    return f"gptq_model-{bits}bit-{group_size}g.safetensors" if autogptq else SINGLE_FILE_NAME


def _save_safetensors(tensors: Mapping[str, torch.Tensor] | Sequence[TensorRef], path: Path) -> None:
    """Write a safetensors file atomically, tensor by tensor: a dict of tensors in memory (quantize's work files)
    or ``TensorRef`` s loaded one at a time (the checkpoint's shards).

    The bytes are those ``safetensors.torch.save_file`` writes, but the temporary is opened here with
    :func:`~gptq_tools.files.fileio.open_nofollow`: ``save_file`` opens its path by name and would write
    through a link put in the temporary's place (the staging folder may be one others can write).

    Raises:
        UnsafePathError: a link was put where the temporary is written.
        InsufficientSpaceError: the disk filled up (or a file-size limit was hit) while writing.
    """
    if isinstance(tensors, Mapping):
        tensors = [TensorRef(name, tensor.numel() * tensor.element_size(), lambda tensor=tensor: tensor,
                             dtype=_SAFETENSORS_DTYPES[tensor.dtype], shape=tuple(tensor.shape))
                   for name, tensor in tensors.items()]
    try:
        with atomic_path(path, force=True) as temp, \
                open(open_nofollow(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as handle:
            _stream_safetensors(tensors, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise_if_no_space(exc, path)
        raise


def _stream_safetensors(refs: Sequence[TensorRef], handle: Any) -> None:
    """Header first, then each tensor loaded, written and dropped: memory is one tensor, not the file."""
    metas = []
    for ref in refs:
        if ref.dtype is None or ref.shape is None:
            tensor = ref.load()
            metas.append((ref.name, _SAFETENSORS_DTYPES[tensor.dtype], tuple(tensor.shape)))
            del tensor
        else:
            metas.append((ref.name, ref.dtype, tuple(ref.shape)))
    order = _safetensors_order(metas)
    header, _ = build_header([metas[i] for i in order], metadata={"format": "pt"})
    handle.write(header)
    for i in order:
        tensor = refs[i].load().contiguous()
        name, dtype, shape = metas[i]
        if _SAFETENSORS_DTYPES.get(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
            raise QuantizationError(f"{name}: the tensor read back is {tensor.dtype} {tuple(tensor.shape)}, "
                                    f"not {dtype} {shape} as planned; delete the work folder and quantize again")
        handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        del tensor


def _safetensors_order(metas: Sequence[tuple[str, str, tuple[int, ...]]]) -> list[int]:
    """The order ``safetensors`` itself lays tensors out in (by dtype, then name), asked of safetensors
    with empty stand-ins so the streamed file is byte-identical to ``save_file``'s."""
    from safetensors.torch import save

    by_dtype = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}
    blob = save({name: torch.empty(0, dtype=by_dtype[dtype]) for name, dtype, _ in metas})
    length = int.from_bytes(blob[:8], "little")
    names = [key for key in json.loads(blob[8:8 + length]) if key != "__metadata__"]
    position = {name: i for i, (name, _, _) in enumerate(metas)}
    return [position[name] for name in names]


def write_tensors(refs: Sequence[TensorRef], folder: Path, *, max_shard_size: int,
                  single_file: str | None = None) -> list[str]:
    """Write ``refs`` into ``folder`` as one file (``single_file``) or HF-style shards plus an index.

    Returns:
        The file names written (tensor files and index).

    Raises:
        InsufficientSpaceError: the disk filled up.
    """
    if single_file:
        _save_safetensors(refs, folder / single_file)
        return [single_file]
    by_name = {ref.name: ref for ref in refs}
    shards = [[by_name[n] for n in names] for names in plan_shards([(r.name, r.nbytes) for r in refs], max_shard_size)]
    weight_map: dict[str, str] = {}
    names = []
    for name, shard in zip(shard_names(len(shards)), shards):
        _save_safetensors(shard, folder / name)
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
    from ..files.manifest import write_manifest

    entries = {path.name: sha256_file(path) for path in sorted(folder.iterdir())
               if path.is_file() and path.name != MANIFEST_NAME}
    write_manifest(folder / MANIFEST_NAME, entries, merge=False)
    return folder / MANIFEST_NAME


def publish(staging: Path, output: Path) -> None:
    """Rename the finished ``staging`` folder to ``output`` (which may exist only as an empty folder).

    Raises:
        OutputExistsError: ``output`` appeared and is not empty.
    """
    if output.exists():
        if any(output.iterdir()):
            raise OutputExistsError(f"{output}: output folder is not empty; choose another or empty it "
                                    f"(the finished checkpoint is kept in {staging})")
        rmtree(output)  # an empty folder: os.replace cannot rename a folder over it
    replace(staging, output)
    fsync_dir(output.parent)


def finished_checkpoint(output: Path) -> tuple[str, ...] | None:
    """The file names of ``output`` when it is a complete checkpoint: its ``SHA256SUMS`` lists every other
    file and every file matches. None otherwise (missing, empty, unlisted or damaged files)."""
    from ..files.manifest import parse_manifest

    if not (output / MANIFEST_NAME).is_file():
        return None
    listed = parse_manifest(output / MANIFEST_NAME)
    files = sorted(p.name for p in output.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    if sorted(listed) != files or any(sha256_file(output / name) != listed[name] for name in files):
        return None
    return tuple(sorted([*files, MANIFEST_NAME]))


def check_output_folder(output: Path) -> None:
    """Refuse an output folder that exists and is not empty, or is a file.

    Raises:
        OutputExistsError: it is not empty (or is a file).
    """
    if output.is_symlink():
        raise OutputExistsError(f"{output}: is a symbolic link; the finished checkpoint is published by renaming a "
                                f"folder onto this name, which a link cannot take. Give the real folder (its "
                                f"target) or a new name")
    if output.is_file():
        raise OutputExistsError(f"{output} is a file; give a new or empty folder for the quantized checkpoint")
    if output.is_dir() and any(output.iterdir()):
        if (output / MANIFEST_NAME).is_file() and (output / "quantize_config.json").is_file():
            raise OutputExistsError(f"{output}: already holds a quantized checkpoint (quantize_config.json, "
                                    f"{MANIFEST_NAME}); --resume keeps it when every file matches {MANIFEST_NAME} "
                                    f"(nothing is redone); if --resume refuses too, a file does not match "
                                    f"(`gptq-tools verify -c {output}/{MANIFEST_NAME}` names it): empty the folder "
                                    f"or choose another")
        raise OutputExistsError(f"{output}: output folder is not empty; choose another or empty it")


__all__ = [
    "InsufficientSpaceError",
    "TensorRef",
    "check_output_folder",
    "copy_tokenizer",
    "finished_checkpoint",
    "publish",
    "single_file_name",
    "write_json",
    "write_checksums",
    "write_tensors",
]
