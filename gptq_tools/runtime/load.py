"""Load a GPTQ checkpoint across GPUs, CPU and disk, streaming each tensor straight to its device.

The model is built on the meta device from its config, the quantized linears are swapped for
:class:`~gptq_tools.runtime.qlinear.QuantLinear`, the planner decides where every module goes, and each tensor is
then taken from the safetensors file(s) by offset:

* CPU-placed tensors are views of a copy-on-write memory map of the file (as ``safe_open`` does): no
  allocation, no copy; the pages are faulted in during the load so the weights are resident after it;
* GPU-placed tensors are read (``readinto``) into one reused staging buffer and copied to the GPU, so
  their bytes never accumulate on the host;
* disk-placed modules are read the same way and written to ``offload_folder`` one module at a time.

Nothing else is held: no state dict, no second copy. Host memory beyond the CPU-placed weights stays at
the staging buffer (the largest tensor) plus what the interpreter, torch and transformers need.
accelerate's hooks then run the offloaded modules. Split parts are mapped part by part and read through
:class:`~gptq_tools.files.parts.MultiPartReader` as one virtual file, never joined on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.model_files import (
    CheckpointFiles,
    MappedWeightFile,
    WeightFile,
    open_weight_file,
    read_tensor_into,
    torch_dtype,
)
from ..constants import IO_CHUNK_BYTES
from ..errors import CheckpointError, ChecksumMismatchError, UsageError
from ..progress import byte_bar
from ..units import parse_size
from . import decode
from .kernels import KernelDecision, summarize
from .plan import (
    DeviceKey,
    PlanOptions,
    build_checkpoint_model,
    layout_from_model,
    parse_max_memory,
    place_layout,
    tied_names,
)
from .qlinear import QuantLinear

logger = logging.getLogger(__name__)

#: Manifest names looked for beside the weights (sha256sum format), as ``gptq-tools join`` writes them.
MANIFEST_NAMES = ("SHA256SUMS", "SHA256SUMS.txt", "sha256sums.txt")
INTEGER_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8, torch.bool)


def load_quantized(path: str | os.PathLike[str], *, max_memory: str | Mapping[Any, Any] | None = None,
                   device_map: str | Mapping[str, DeviceKey] = "auto", dtype: torch.dtype = torch.float16,
                   offload_folder: str | os.PathLike[str] | None = None, kernel: str = "auto",
                   batch_size: int = 1, seq_len: int = 2048, cuda_context: str | int = "1GiB",
                   verify_hash: bool = True, expected_sha256: str | None = None, preset: str | None = None,
                   allow_pickle: bool = False) -> nn.Module:
    """Load the GPTQ checkpoint in ``path`` as a transformers model ready for ``generate``.

    Args:
        path: the checkpoint folder (config.json, quantize_config.json, safetensors: one file, shards
            with an index, or split parts read as one file).
        max_memory: caps per device (``"0=60GiB,1=79GiB,cpu=64GiB"`` or a dict; sizes as accelerate
            reads them, bare numbers and ints are bytes); only the devices named are used (the CPU only when named, disk
            whenever ``offload_folder`` is given). None: every visible GPU's free memory and the
            available host memory.
        device_map: ``"auto"`` (plan with the caps), a single device (``"cpu"``, ``"cuda:0"``), or an
            explicit ``{module: device}`` map.
        dtype: dtype of every floating-point tensor (scales, norms, embeddings) and of the compute.
        offload_folder: where modules that fit nowhere else go (``"disk"``); None forbids disk offload.
        kernel: QuantLinear kernel name (see :func:`gptq_tools.runtime.qlinear.available_kernels`), or ``"auto"``:
            per layer, the fastest kernel that supports it on the device it runs on.
        batch_size: batch size the GPU headroom is reserved for.
        seq_len: sequence length (prompt plus new tokens) the headroom is reserved for.
        cuda_context: memory the CUDA context takes per GPU (``"1GiB"``; bare numbers are bytes).
        verify_hash: check the weights' SHA256 when ``expected_sha256``, a ``SHA256SUMS`` manifest beside the
            weights, ``preset``, or (without ``preset``) the preset of the repository that gptq-tools'
            own download recorded in the folder gives it. A preset never applies to a folder merely
            because a file has the name it publishes a hash for.
        expected_sha256: the SHA256 of the (joined) weight file.
        preset: a preset whose published hash applies to the weight file.
        allow_pickle: accept pickled weights when there are no safetensors (unsafe; off by default).

    Returns:
        The model (in eval mode), with ``gptq_placement`` holding the plan when ``device_map="auto"`` and
        ``gptq_kernels`` mapping each quantized linear's name to its
        :class:`~gptq_tools.runtime.kernels.KernelDecision` (the kernel it got and why earlier ones were skipped).

    Raises:
        PlacementError: the caps cannot hold the model (the message says by how much and what would fit).
        UsageError: malformed caps, a device that does not exist, an unknown kernel, a named kernel that
            cannot run a layer where it is placed.
        CheckpointError: config and tensors disagree, missing shards, truncated files.
        ChecksumMismatchError: the weights' SHA256 differs from the expected one.
        UnsafeCheckpointError: pickled weights only and ``allow_pickle`` is False.
    """
    started = time.perf_counter()
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    model, arch, settings, files = build_checkpoint_model(folder, dtype=dtype, kernel=kernel,
                                                          allow_pickle=allow_pickle)
    placement = None
    if isinstance(device_map, str) and device_map == "auto":
        options = PlanOptions(dtype=dtype, batch_size=batch_size, seq_len=seq_len, kernel=kernel,
                              cuda_context_bytes=parse_size(cuda_context, what="cuda_context"),
                              allow_disk=offload_folder is not None)
        caps = parse_max_memory(max_memory) if max_memory is not None else default_max_memory()
        check_devices_exist(caps)
        placement = place_layout(layout_from_model(model, arch, settings, source=str(folder), kernel=kernel),
                                 caps, options)
        placement.raise_if_unfit()
        modules_map: dict[str, DeviceKey] = dict(placement.device_map)
    else:
        modules_map = _explicit_map(model, device_map, offload_folder)
    if offload_folder is not None and "disk" in modules_map.values():
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
    if verify_hash:
        _verify_weights(files, expected_sha256=expected_sha256, preset=preset)
    offload_index = _stream_weights(model, files, modules_map, dtype=dtype, offload_folder=offload_folder)
    model.tie_weights()
    _offload_tied_followers(model, modules_map, offload_folder, offload_index)
    _check_nothing_missing(model, modules_map, folder)
    _place_computed_buffers(model, modules_map)
    _dispatch(model, modules_map, offload_folder, offload_index)
    model.eval()
    model.gptq_placement = placement
    model.gptq_settings = settings
    model.gptq_kernels = _kernel_decisions(model)
    for line in decode.install(model, arch):
        logger.info("cpu decode: %s", line)
    logger.info("loaded %s in %.1f s", folder, time.perf_counter() - started)
    return model


def _kernel_decisions(model: nn.Module) -> dict[str, KernelDecision]:
    """Each QuantLinear's kernel and skip reasons, logged as one line per distinct decision."""
    decisions = {name: KernelDecision(module.kernel, tuple(module.kernel_skipped.items()))
                 for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    for line in summarize(decisions):
        logger.info("kernel: %s", line)
    return decisions


def _kernel_target(device: DeviceKey, modules_map: Mapping[str, DeviceKey]) -> tuple[torch.device, bool]:
    """Where a module placed on ``device`` executes, and whether its weights stay there between calls.

    accelerate runs CPU- and disk-placed modules on the first GPU when there is one, moving their weights
    in at every call; only then (and for disk without GPUs) may a kernel not repack them.
    """
    if isinstance(device, int):
        return torch.device("cuda", device), True
    gpus = sorted(d for d in set(modules_map.values()) if isinstance(d, int))
    if gpus:
        return torch.device("cuda", gpus[0]), False
    return torch.device("cpu"), device == "cpu"


def _explicit_map(model: nn.Module, device_map: str | Mapping[str, DeviceKey],
                  offload_folder: str | os.PathLike[str] | None) -> dict[str, DeviceKey]:
    """A single device or a ``{module: device}`` map, checked before anything is read."""
    if isinstance(device_map, str):
        modules_map: dict[str, DeviceKey] = {"": _single_device(device_map)}
    else:
        modules_map = {name: _normalise_device(device) for name, device in device_map.items()}
    check_devices_exist({k: 0 for k in modules_map.values()})
    for name in model.state_dict(keep_vars=True):  # every tensor must have a place
        _device_for(name, modules_map)
    if "disk" in modules_map.values() and offload_folder is None:
        raise UsageError("the device map sends modules to 'disk' but no offload_folder was given")
    return modules_map


def default_max_memory() -> dict[DeviceKey, int]:
    """Caps when none are given: each visible GPU's free memory, and the host's available memory."""
    caps: dict[DeviceKey, int] = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            caps[index] = torch.cuda.mem_get_info(index)[0]
    caps["cpu"] = _available_host_memory()
    return caps


def _available_host_memory() -> int:
    """MemAvailable (free plus reclaimable page cache); free pages only where /proc is unreadable."""
    with contextlib.suppress(OSError):
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_devices_exist(caps: Mapping[DeviceKey, int]) -> None:
    """Raise UsageError for a GPU index this machine does not have."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for key in caps:
        if isinstance(key, int) and key >= count:
            raise UsageError(f"device {key} does not exist: this machine has {count} CUDA device(s)"
                             f"{' (0-' + str(count - 1) + ')' if count else ''}; use cpu or an existing GPU index")


def _single_device(text: str) -> DeviceKey:
    if text in ("cpu", "disk"):
        return text
    return _normalise_device(text)


def _normalise_device(device: Any) -> DeviceKey:
    if isinstance(device, torch.device):
        device = "cpu" if device.type == "cpu" else device.index or 0
    if isinstance(device, int) or device in ("cpu", "disk"):
        return device
    text = str(device)
    if text.startswith("cuda"):
        return int(text.partition(":")[2] or 0)
    raise UsageError(f"device_map: unknown device {device!r}; use a GPU index, 'cuda:N', 'cpu' or 'disk'")


def _device_for(name: str, modules_map: Mapping[str, DeviceKey]) -> DeviceKey:
    """The device of tensor ``name``: that of the longest module prefix in the map."""
    module = name
    while True:
        if module in modules_map:
            return modules_map[module]
        if not module:
            raise UsageError(f"device_map has no entry for tensor {name!r}; add its module (or '' for the rest)")
        module = module.rpartition(".")[0]


def _torch_device(key: DeviceKey) -> torch.device:
    return torch.device("cuda", key) if isinstance(key, int) else torch.device("cpu")


# ------------------------------------------------------------------------------------------- hashing
def _expected_hash(files: CheckpointFiles, *, expected_sha256: str | None,
                   preset: str | None) -> dict[str, tuple[str, str]]:
    """File label -> (expected SHA256, where it comes from): the argument, a preset, or a manifest beside the
    weights. A pinned hash (the argument or a preset's) is never replaced by the folder's ``SHA256SUMS``,
    which came with the files it would vouch for; a manifest that disagrees with one is an error.

    Raises:
        UsageError: ``expected_sha256`` for a sharded checkpoint.
        ChecksumMismatchError: the folder's manifest and a pinned hash disagree (both are named).
    """
    hashes: dict[str, tuple[str, str]] = {}
    if expected_sha256:
        if len(files.files) != 1:
            raise UsageError("expected_sha256 applies to a single weight file (or parts); this checkpoint is sharded, "
                             "use a SHA256SUMS manifest instead")
        hashes[files.files[0].label] = (expected_sha256.lower(), "expected_sha256")
    # A preset's hash is for its repository's file, not for every file of that (very common) name:
    # it applies only to the preset the caller named, or to one our own download recorded here.
    for loaded, branches in ([] if expected_sha256 else _presets_for_folder(files.folder, preset)):
        for wf in files.files:
            digest = next((loaded.expected_sha256(wf.label, branch) for branch in branches
                           if loaded.expected_sha256(wf.label, branch)), None)
            if digest and wf.label not in hashes:
                hashes[wf.label] = (digest.lower(), f"preset {loaded.name}")
    manifest = next((files.folder / n for n in MANIFEST_NAMES if (files.folder / n).is_file()), None)
    if manifest is not None:
        from ..files.manifest import parse_manifest

        entries = parse_manifest(manifest)
        for wf in files.files:
            served = entries.get(wf.label, "").lower()
            if not served:
                continue
            pinned = hashes.setdefault(wf.label, (served, str(manifest)))
            if pinned[0] != served:
                raise ChecksumMismatchError(
                    f"{files.folder}: {wf.label}: {pinned[1]} pins SHA256 {pinned[0]} but {manifest} lists {served}; "
                    f"a pinned hash is never overridden by a manifest that came with the files. Remove or fix the "
                    f"manifest if the pinned hash is right, else download the checkpoint again")
    return hashes


def _presets_for_folder(folder: Path, preset: str | None) -> list[tuple[Any, list[str]]]:
    """(preset, branches) whose published hashes apply to ``folder``.

    The named ``preset`` (every branch), else each preset whose repository gptq-tools' own download
    recorded in ``folder`` (only the branches recorded), else none.
    """
    from ..checkpoint.presets import list_presets, load_preset
    from ..hub.state import LocalState

    if preset:
        loaded = load_preset(preset)
        return [(loaded, list(loaded.branches))]
    state = LocalState(folder)
    found = []
    for name in list_presets():
        loaded = load_preset(name)
        branches = [branch for branch in loaded.branches
                    if (state.load_listing(branch) or {}).get("repo_id") == loaded.repo_id]
        if branches:
            found.append((loaded, branches))
    return found


def _verify_weights(files: CheckpointFiles, *, expected_sha256: str | None, preset: str | None) -> None:
    hashes = _expected_hash(files, expected_sha256=expected_sha256, preset=preset)
    for wf in files.files:
        expected, source = hashes.get(wf.label, (None, ""))
        if expected is None:
            continue
        digest = hashlib.sha256()
        buffer = bytearray(IO_CHUNK_BYTES)
        view = memoryview(buffer)
        with open_weight_file(wf) as stream, byte_bar(wf.header.file_size, f"sha256 {wf.label}") as bar:
            while got := stream.readinto(view):
                digest.update(view[:got])
                bar.update(got)
        if digest.hexdigest() != expected:
            where = f"{len(wf.paths)} parts of {wf.label}" if wf.is_parts else wf.label
            raise ChecksumMismatchError(
                f"{files.folder}: SHA256 of {where} is {digest.hexdigest()}, expected {expected} (from {source}); a "
                f"part is damaged, truncated or out of order: download it again (or pass verify_hash=False to skip)")
        logger.info("%s: SHA256 OK", wf.label)


# ----------------------------------------------------------------------------------------- streaming
class _Staging:
    """One reusable host buffer for GPU-bound tensors (pinned when CUDA is there), grown on demand."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        return self.buffer[:nbytes].view(dtype).reshape(shape)


def _stream_weights(model: nn.Module, files: CheckpointFiles, modules_map: Mapping[str, DeviceKey], *,
                    dtype: torch.dtype, offload_folder: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Read every tensor into place; returns the disk-offload index (empty without disk modules)."""
    if files.layout == "pickle":
        return _load_pickled(model, files, modules_map, dtype=dtype, offload_folder=offload_folder)
    followers = tied_names(model)
    expected = dict(model.state_dict(keep_vars=True))
    wanted = {name for name in expected if name not in followers}
    remaining = Counter(name.rpartition(".")[0] for name in wanted)
    staging, offload_index = _Staging(), {}
    total = sum(e.nbytes for n, e in files.entries.items() if n in wanted)
    with byte_bar(total, "loading") as bar:
        for wf in files.files:
            mapped = MappedWeightFile(wf) if "cpu" in modules_map.values() else None
            with open_weight_file(wf) as stream:
                for entry in sorted(wf.header.tensors.values(), key=lambda e: e.begin):
                    if entry.name not in wanted:
                        continue
                    device = _device_for(entry.name, modules_map)
                    tensor = _read_one(stream, wf, entry, device, expected[entry.name], staging, dtype=dtype,
                                       mapped=mapped)
                    _assign(model, entry.name, tensor)
                    module_name = entry.name.rpartition(".")[0]
                    remaining[module_name] -= 1
                    if remaining[module_name] == 0:
                        _module_complete(model, module_name, device, offload_folder, offload_index,
                                         target=_kernel_target(device, modules_map))
                    bar.update(entry.nbytes)
    return offload_index


def _read_one(stream: Any, wf: WeightFile, entry: Any, device: DeviceKey, like: torch.Tensor, staging: _Staging,
              *, dtype: torch.dtype, mapped: MappedWeightFile | None) -> torch.Tensor:
    """One tensor on its device: a mapped view on the CPU, else read through the staging buffer."""
    source_dtype = torch_dtype(entry, source=wf.label)
    target_dtype = like.dtype if like.dtype in INTEGER_DTYPES else dtype
    if device == "cpu" and source_dtype == target_dtype and mapped is not None:
        view = mapped.view(entry)
        if view is not None:
            return view
    if isinstance(device, int) or source_dtype != target_dtype:
        host = staging.take(entry.nbytes, source_dtype, tuple(entry.shape))
        read_tensor_into(stream, entry, host, source=wf.label)
        return host.to(_torch_device(device) if isinstance(device, int) else "cpu", dtype=target_dtype, copy=True)
    host = torch.empty(tuple(entry.shape), dtype=source_dtype)  # disk-bound, or a tensor that cannot be mapped
    return read_tensor_into(stream, entry, host, source=wf.label)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attribute in module._parameters:
        module._parameters[attribute] = nn.Parameter(tensor, requires_grad=False)
    elif attribute in module._buffers:
        module._buffers[attribute] = tensor
    else:
        raise CheckpointError(f"tensor {name!r} has no place in the model")


def _module_complete(model: nn.Module, module_name: str, device: DeviceKey,
                     offload_folder: str | os.PathLike[str] | None, offload_index: dict[str, Any], *,
                     target: tuple[torch.device, bool]) -> None:
    """All tensors of ``module_name`` are in: prepare a QuantLinear and pick its kernel for ``target``
    (execution device, whether its weights stay resident); send a disk module to the folder."""
    module = model.get_submodule(module_name)
    if isinstance(module, QuantLinear):
        _check_scales(module_name, module.scales)
        module.prepare()
        module.select_kernel(target[0], allow_repack=target[1])
    if device == "disk":
        from accelerate.utils import offload_weight

        for attribute, tensor in list(module.state_dict(keep_vars=True).items()):
            if "." in attribute:
                continue
            full = f"{module_name}.{attribute}" if module_name else attribute
            offload_weight(tensor.detach(), full, str(offload_folder), index=offload_index)
            _assign(model, full, torch.empty_like(tensor, device="meta"))


def _offload_tied_followers(model: nn.Module, modules_map: Mapping[str, DeviceKey],
                            offload_folder: str | os.PathLike[str] | None, offload_index: dict[str, Any]) -> None:
    """Give each disk-placed tied tensor (a tied ``lm_head.weight``) its own entry in the offload folder.

    accelerate's hook for a disk module looks its tensors up by their own names (``lm_head.weight``), but
    a tied follower is never read from the checkpoint, so only its owner (``...embed_tokens.weight``) was
    offloaded: with everything on disk the head's first call died with ``KeyError: 'lm_head.weight'``.
    The owner's file is hard-linked under the follower's name (no second copy of the embedding on disk),
    copied where the filesystem has no hard links, or written from the owner when the owner is not on disk.
    """
    for follower, owner in tied_names(model).items():
        if follower in offload_index or _device_for(follower, modules_map) != "disk":
            continue
        folder = Path(os.fspath(offload_folder))
        if owner in offload_index:
            target = folder / f"{follower}.dat"
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            try:
                os.link(folder / f"{owner}.dat", target)
            except OSError:
                import shutil

                shutil.copyfile(folder / f"{owner}.dat", target)
            offload_index[follower] = dict(offload_index[owner])
        else:
            from accelerate.utils import offload_weight

            offload_weight(model.get_parameter(owner).detach(), follower, str(folder), index=offload_index)


def _check_scales(module_name: str, scales: torch.Tensor) -> None:
    """Refuse NaN or infinite scales (also those a cast to the load dtype overflowed): they poison every output."""
    finite = torch.isfinite(scales)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise CheckpointError(
            f"tensor {module_name}.scales: {bad} of {scales.numel()} values are NaN or infinite in {scales.dtype}; "
            f"the checkpoint is damaged or was quantized from broken weights: download or quantize it again")


def _load_pickled(model: nn.Module, files: CheckpointFiles, modules_map: Mapping[str, DeviceKey], *,
                  dtype: torch.dtype, offload_folder: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Explicitly allowed pickled weights: ``torch.load(weights_only=True, mmap=True)``, file by file."""
    expected = dict(model.state_dict(keep_vars=True))
    followers = tied_names(model)
    remaining = Counter(name.rpartition(".")[0] for name in expected if name not in followers)
    offload_index: dict[str, Any] = {}
    for pickle_path in files.pickle_paths:
        logger.warning("unpickling %s (allowed explicitly; weights_only=True)", pickle_path)
        state = torch.load(pickle_path, map_location="cpu", weights_only=True, mmap=True)
        for name, value in state.items():
            if name not in expected or name in followers:
                continue
            if tuple(value.shape) != tuple(expected[name].shape):
                raise CheckpointError(f"{pickle_path}: tensor {name!r} has shape {tuple(value.shape)}, the config "
                                      f"gives {tuple(expected[name].shape)}")
            device = _device_for(name, modules_map)
            target = expected[name].dtype if expected[name].dtype in INTEGER_DTYPES else dtype
            _assign(model, name, value.to(_torch_device(device) if device != "disk" else "cpu", dtype=target,
                                          copy=True))
            module_name = name.rpartition(".")[0]
            remaining[module_name] -= 1
            if remaining[module_name] == 0:
                _module_complete(model, module_name, device, offload_folder, offload_index,
                                 target=_kernel_target(device, modules_map))
        del state
    return offload_index


def _check_nothing_missing(model: nn.Module, modules_map: Mapping[str, DeviceKey], folder: Path) -> None:
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta" and _device_for(name, modules_map) != "disk":
            raise CheckpointError(f"{folder}: tensor {name!r} is missing from the checkpoint; the files belong to "
                                  f"another model or are incomplete")


def _place_computed_buffers(model: nn.Module, modules_map: Mapping[str, DeviceKey]) -> None:
    """Move buffers the model computes itself (rotary tables: not in the checkpoint) to their module's device."""
    persistent = set(model.state_dict(keep_vars=True))
    for name, buffer in list(model.named_buffers()):
        if name in persistent or buffer is None or buffer.device.type == "meta":
            continue
        device = _device_for(name, modules_map)
        if isinstance(device, int) and buffer.device != _torch_device(device):
            module_name, _, attribute = name.rpartition(".")
            model.get_submodule(module_name)._buffers[attribute] = buffer.to(_torch_device(device))


def _dispatch(model: nn.Module, modules_map: Mapping[str, DeviceKey], offload_folder: str | os.PathLike[str] | None,
              offload_index: dict[str, Any]) -> None:
    """Attach accelerate's hooks when the model spans several devices (or disk)."""
    devices = set(modules_map.values())
    if len(devices) <= 1 and "disk" not in devices:
        return
    from accelerate import dispatch_model
    from accelerate.utils import save_offload_index

    if offload_index:
        save_offload_index(offload_index, str(offload_folder))
    gpus = sorted(d for d in devices if isinstance(d, int))
    dispatch_model(model, device_map=dict(modules_map), main_device=gpus[0] if gpus else "cpu",
                   offload_dir=str(offload_folder) if offload_folder is not None else None,
                   offload_buffers=True)
