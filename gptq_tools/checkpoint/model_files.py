"""Finding and reading the files of a GPTQ checkpoint folder, for the planner and the loader.

A checkpoint folder holds ``config.json``, the quantization settings (``quantize_config.json`` or
``config.json``'s ``quantization_config``) and its weights in one of these layouts:

* one safetensors file (AutoGPTQ's ``gptq_model-4bit-128g.safetensors``, ``model.safetensors``);
* sharded safetensors with ``model.safetensors.index.json``;
* one safetensors file uploaded as split parts (``...JOINBEFOREUSE.split-a.safetensors``): the parts are
  read as one virtual file, never joined on disk;
* pickled weights only (``pytorch_model.bin``): refused unless explicitly allowed.

Only headers are read here; tensors are read on request, straight into a caller-given tensor.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError, UnsafeCheckpointError
from ..files.safetensors_format import (
    SafetensorsHeader,
    TensorEntry,
    read_header,
    read_header_from,
)
from .packing import CHECKPOINT_FORMATS, SUPPORTED_BITS

logger = logging.getLogger(__name__)

#: safetensors dtype names and their torch dtypes (the ones a GPTQ checkpoint uses).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class QuantizeSettings:
    """The GPTQ settings a checkpoint was written with (AutoGPTQ ``quantize_config.json`` fields)."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"
    model_file_base_name: str | None = None


def settings_from_dict(data: dict[str, Any], *, source: str) -> QuantizeSettings:
    """Validate a ``quantize_config`` dict.

    Raises:
        CheckpointError: a field of the wrong type (bits ``"four"``, desc_act ``"yes"``), unsupported bits,
            group size or checkpoint format (named with ``source``).
    """
    bits, group_size = data.get("bits", 4), data.get("group_size", 128)
    checkpoint_format = data.get("checkpoint_format") or data.get("format") or "gptq"
    if type(bits) is not int or bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{source}: bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    if type(group_size) is not int or group_size == 0 or group_size < -1:
        raise CheckpointError(f"{source}: group_size={group_size!r} is invalid; use -1 or a positive integer")
    for flag in ("desc_act", "sym", "static_groups", "true_sequential"):
        if data.get(flag) is not None and not isinstance(data[flag], bool):
            raise CheckpointError(f"{source}: {flag}={data[flag]!r} must be true or false")
    base_name = data.get("model_file_base_name")
    if base_name is not None and (not isinstance(base_name, str) or base_name in ("", ".", "..")
                                  or any(c in base_name for c in "/\\\0")):
        raise CheckpointError(f"{source}: model_file_base_name={base_name!r} must be a plain file name "
                              f"(no folders)")
    if not isinstance(checkpoint_format, str) or checkpoint_format not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"{source}: checkpoint_format {checkpoint_format!r} is not supported; use one of "
                              f"{CHECKPOINT_FORMATS}")
    method = data.get("quant_method", "gptq")
    if method != "gptq":
        raise CheckpointError(f"{source}: quant_method {method!r} is not GPTQ; this loader reads GPTQ checkpoints")
    return QuantizeSettings(bits=bits, group_size=group_size, desc_act=bool(data.get("desc_act", False)),
                            sym=bool(data.get("sym", True)), checkpoint_format=checkpoint_format,
                            model_file_base_name=data.get("model_file_base_name"))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; CheckpointError when it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc}); fix or replace the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_quantize_config(folder: Path) -> tuple[dict[str, Any], str]:
    """The raw quantization settings and where they came from: ``quantize_config.json``, else
    ``config.json``'s ``quantization_config``.

    Raises:
        CheckpointError: neither exists.
    """
    path = folder / "quantize_config.json"
    if path.is_file():
        return read_json(path), str(path)
    config_path = folder / "config.json"
    quantization = read_json(config_path).get("quantization_config") if config_path.is_file() else None
    if isinstance(quantization, dict):
        return dict(quantization), f"{config_path} quantization_config"
    raise CheckpointError(f"{folder}: no quantize_config.json and no quantization_config in config.json; "
                          f"this is not a GPTQ checkpoint folder")


def read_quantize_settings(folder: Path) -> QuantizeSettings:
    """Validated settings from :func:`read_quantize_config`.

    Raises:
        CheckpointError: no settings, or invalid ones.
    """
    data, source = read_quantize_config(folder)
    return settings_from_dict(data, source=source)


@dataclass(frozen=True)
class WeightFile:
    """One safetensors file, possibly stored as split parts read as one virtual file."""

    label: str  # the file name (for parts: the name of the joined file)
    paths: tuple[Path, ...]
    header: SafetensorsHeader

    @property
    def is_parts(self) -> bool:
        return len(self.paths) > 1


@dataclass(frozen=True)
class CheckpointFiles:
    """The weight files of a checkpoint folder and which file holds each tensor."""

    folder: Path
    layout: str  # "single", "sharded", "parts" or "pickle"
    files: tuple[WeightFile, ...]
    tensor_file: dict[str, int] = field(default_factory=dict)  # tensor name -> index into files
    pickle_paths: tuple[Path, ...] = ()

    @property
    def entries(self) -> dict[str, TensorEntry]:
        """Every tensor's header entry (all files together)."""
        return {name: entry for wf in self.files for name, entry in wf.header.tensors.items()}

    @property
    def total_bytes(self) -> int:
        return sum(wf.header.file_size for wf in self.files)


def find_checkpoint_files(folder: str | os.PathLike[str], *, base_name: str | None = None,
                          allow_pickle: bool = False) -> CheckpointFiles:
    """Find the weights of the checkpoint in ``folder`` and read their headers (nothing else).

    Args:
        folder: the checkpoint folder.
        base_name: AutoGPTQ's ``model_file_base_name``, to pick one file among several.
        allow_pickle: accept pickled weights when there are no safetensors (never the default).

    Raises:
        CheckpointError: no weights, ambiguous files, a missing shard or a bad index.
        UnsafeCheckpointError: only pickled weights and ``allow_pickle`` is False.
        PartSetError: split parts are incomplete.
        SafetensorsFormatError: a header breaks the format.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; give the checkpoint folder (with config.json)")
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        return _sharded(folder, indexes[0])
    plain = sorted(p for p in folder.glob("*.safetensors") if not _looks_like_part(p.name))
    if base_name and (folder / f"{base_name}.safetensors").is_file():
        plain = [folder / f"{base_name}.safetensors"]
    if len(plain) == 1:
        wf = WeightFile(plain[0].name, (plain[0],), read_header(plain[0]))
        return CheckpointFiles(folder, "single", (wf,), dict.fromkeys(wf.header.tensors, 0))
    if len(plain) > 1:
        raise CheckpointError(f"{folder}: several safetensors files ({', '.join(p.name for p in plain)}) and no "
                              f"{INDEX_SUFFIX}; keep one, or add an index for a sharded checkpoint")
    if any(_looks_like_part(p.name) for p in folder.iterdir() if ".safetensors" in p.name):
        return _parts(folder)
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{folder}: only pickled weights ({', '.join(p.name for p in pickles)}); unpickling can run "
                f"arbitrary code, so it is refused; convert them to safetensors, or pass allow_pickle=True "
                f"(--allow-pickle) if you trust the source")
        return CheckpointFiles(folder, "pickle", (), {}, tuple(pickles))
    raise CheckpointError(f"{folder}: no weights found (no *.safetensors, no {INDEX_SUFFIX}); download the "
                          f"weight files into this folder")


def _looks_like_part(name: str) -> bool:
    from ..files.parts import parse_part_name

    return parse_part_name(name) is not None


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name -> shard file name.

    Shard names come from outside (the index is downloaded with the weights), so each goes through the
    same validator as Hub file names: no ``..``, no absolute path, no control character, text only.

    Raises:
        CheckpointError: no ``weight_map``, or a tensor name that is not text.
        UnsafeNameError: a shard name would leave the folder (the message quotes it).
    """
    from ..files.names import validate_relative_name

    data = read_json(index_path)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map; the index is damaged")
    for tensor, shard in weight_map.items():
        validate_relative_name(shard, what=f"{index_path}: tensor {tensor!r} is mapped to shard")
    return weight_map


def _sharded(folder: Path, index_path: Path) -> CheckpointFiles:
    weight_map = read_weight_map(index_path)
    names = sorted(set(weight_map.values()))
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: missing shard(s) {', '.join(missing)} named in {index_path.name}; "
                              f"download them (or fix the index)")
    files = tuple(WeightFile(name, (folder / name,), read_header(folder / name)) for name in names)
    tensor_file: dict[str, int] = {}
    for index, wf in enumerate(files):
        for tensor in wf.header.tensors:
            tensor_file[tensor] = index
    for tensor, shard in weight_map.items():
        if tensor not in tensor_file or files[tensor_file[tensor]].label != shard:
            raise CheckpointError(f"{index_path}: tensor {tensor!r} is mapped to {shard} but that shard does not "
                                  f"hold it; the index and the shards disagree")
    return CheckpointFiles(folder, "sharded", files, tensor_file)


def _parts(folder: Path) -> CheckpointFiles:
    from ..files.parts import MultiPartReader, check_safetensors_parts, find_part_set

    part_set = find_part_set(folder)
    check_safetensors_parts(part_set)  # names the missing, truncated or extra part
    reader = MultiPartReader(part_set.parts)
    try:
        header = read_header_from(reader, reader.size, source=f"{folder / part_set.output_name} (as parts)")
    finally:
        reader.close()
    wf = WeightFile(part_set.output_name, tuple(part_set.parts), header)
    logger.info("reading %s from %d parts without joining them", part_set.output_name, len(part_set.parts))
    return CheckpointFiles(folder, "parts", (wf,), dict.fromkeys(header.tensors, 0))


@contextmanager
def open_weight_file(wf: WeightFile) -> Iterator[BinaryIO]:
    """An unbuffered binary stream over ``wf`` (a plain file, or its parts as one virtual file)."""
    if wf.is_parts:
        from ..files.parts import MultiPartReader

        stream: Any = MultiPartReader(wf.paths)
    else:
        stream = open(wf.paths[0], "rb", buffering=0)  # noqa: SIM115 - closed below
    try:
        yield stream
    finally:
        stream.close()


def read_tensor_into(stream: BinaryIO, entry: TensorEntry, out: torch.Tensor, *, source: str) -> torch.Tensor:
    """Read ``entry``'s bytes from ``stream`` straight into the contiguous CPU tensor ``out``.

    ``out`` must have exactly ``entry.nbytes`` bytes; it is filled in place (no intermediate copy) and
    returned viewed with the entry's dtype and shape.

    Raises:
        CheckpointError: the file ends early.
    """
    raw = out.view(torch.uint8).reshape(-1)
    if raw.numel() != entry.nbytes:
        raise CheckpointError(f"{source}: tensor {entry.name!r} has {entry.nbytes} bytes, expected {raw.numel()}")
    view = memoryview(raw.numpy()).cast("B")
    stream.seek(entry.begin)
    done = 0
    while done < entry.nbytes:
        got = stream.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{source}: file ends at byte {entry.begin + done} inside tensor {entry.name!r}; "
                                  f"the file is truncated: download it again")
        done += got
    return raw.view(TORCH_DTYPES[entry.dtype]).reshape(entry.shape)


def torch_dtype(entry: TensorEntry, *, source: str) -> torch.dtype:
    """The torch dtype of ``entry``; CheckpointError for dtypes a GPTQ checkpoint never holds."""
    try:
        return TORCH_DTYPES[entry.dtype]
    except KeyError:
        raise CheckpointError(f"{source}: tensor {entry.name!r} has dtype {entry.dtype}, which this loader does "
                              f"not read") from None


class MappedWeightFile:
    """Copy-on-write memory maps of a weight file (or of each of its parts), for zero-copy CPU tensors.

    A tensor that lies inside one mapped file becomes a view of the mapping: no allocation and no copy;
    its pages are the page cache's until written (writes go to private copies; the file never changes).
    A tensor that straddles two parts, or is misaligned for its dtype, gets no view (``None``).
    Each view keeps its mapping alive, so the mapping costs memory only for the pages of tensors in use.
    """

    def __init__(self, wf: WeightFile) -> None:
        self.label = wf.label
        self.starts: list[int] = []
        self.maps: list[mmap.mmap | None] = []
        position = 0
        for path in wf.paths:
            size = path.stat().st_size
            self.starts.append(position)
            if size:
                with open(path, "rb") as handle:
                    mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                    with contextlib.suppress(AttributeError, OSError):  # larger readahead on page faults
                        mapping.madvise(mmap.MADV_SEQUENTIAL)
                    self.maps.append(mapping)
            else:
                self.maps.append(None)
            position += size

    def view(self, entry: TensorEntry) -> torch.Tensor | None:
        """``entry`` as a tensor viewing the mapping, or None when it cannot be viewed in place."""
        index = bisect.bisect_right(self.starts, entry.begin) - 1
        mapping = self.maps[index]
        begin = entry.begin - self.starts[index]
        dtype = TORCH_DTYPES.get(entry.dtype)
        if mapping is None or dtype is None or begin + entry.nbytes > len(mapping) or entry.nbytes == 0:
            return None
        if begin % torch.empty((), dtype=dtype).element_size():
            return None
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        with contextlib.suppress(AttributeError, OSError):  # read the whole tensor ahead, not page by page
            mapping.madvise(mmap.MADV_WILLNEED, start, begin + entry.nbytes - start)
        raw = torch.frombuffer(mapping, dtype=torch.uint8, count=entry.nbytes, offset=begin)
        tensor = raw.view(dtype).reshape(entry.shape)
        raw[::mmap.PAGESIZE].sum()  # fault the pages in now, so that the load leaves the weights resident
        return tensor

    def close(self) -> None:
        """Drop this object's references; mappings stay alive while tensors view them."""
        self.maps = []
