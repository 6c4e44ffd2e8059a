"""Plan where every module of a GPTQ model goes, before loading anything.

The planner builds the model on the meta device from its config (no weights), swaps the quantized
linears for :class:`~gptq_tools.runtime.qlinear.QuantLinear`, and takes every tensor's size from the checkpoint's
safetensors headers (or, for a preset without files, from the config and quantization settings). It
then fills the devices in order, GPU 0 first, keeping modules in execution order, and charges each
device its real headroom:

* the CUDA context (per GPU);
* activations and the dequantization workspace of the kernel, on every GPU that runs decoder layers;
* the KV cache of the layers it holds, for the stated batch size and sequence length;
* the output logits, on the device that holds the head (with a tied head: the embedding's device);
* a staging area for the largest offloaded module on the main GPU, only when something is offloaded.

Unlike accelerate's ``infer_auto_device_map`` it holds back no "largest layer" on GPU 0 (BLOOM-176B's
7 GB embedding) unless layers are actually offloaded. ``max_memory`` caps are total budgets per device:
weights plus headroom never exceed them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.architectures import ArchSpec, get_arch
from ..checkpoint.config_check import check_config_against_headers, validate_model_config
from ..checkpoint.model_files import (
    CheckpointFiles,
    QuantizeSettings,
    find_checkpoint_files,
    read_json,
    read_quantize_settings,
    settings_from_dict,
)
from ..errors import CheckpointError, PlacementError, UsageError
from ..units import format_size, parse_size, size_arg_at_least
from .kernels import planning_workspace
from .qlinear import QuantLinear, check_quant_shape

logger = logging.getLogger(__name__)

GiB = 1024**3
DeviceKey = int | str  # a CUDA index, "cpu" or "disk"

#: Tensors some writers add that the model does not need (ignored when present in a checkpoint).
IGNORED_EXTRA_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")


# --------------------------------------------------------------------------------------------- caps
def parse_max_memory(spec: str | Mapping[Any, Any] | None) -> dict[DeviceKey, int]:
    """Parse ``"0=60GiB,1=79GiB,cpu=100GiB"`` (or a dict) into ``{0: bytes, 1: bytes, "cpu": bytes}``.

    Keys are CUDA indices (``0``, ``"cuda:1"``), ``"cpu"`` or ``"disk"``. Values are read exactly as
    accelerate reads them (:func:`gptq_tools.units.parse_size`: ``GiB`` powers of 2, ``GB`` powers of 10);
    a bare number, in a string or as an ``int``, is a byte count, as an ``int`` is in accelerate.

    Raises:
        UsageError: a malformed entry, an unknown device or a repeated device.
    """
    if spec is None:
        return {}
    if isinstance(spec, str):
        items: list[tuple[Any, Any]] = []
        for chunk in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, value = chunk.partition("=")
            if not sep or not value.strip():
                raise UsageError(f"max_memory: {chunk!r} is not DEVICE=SIZE; write it like 0=60GiB,1=79GiB,cpu=100GiB")
            items.append((key.strip(), value.strip()))
    else:
        items = list(spec.items())
    caps: dict[DeviceKey, int] = {}
    for raw_key, raw_value in items:
        key = _device_key(raw_key)
        if key in caps:
            raise UsageError(f"max_memory: device {key!r} is given twice")
        caps[key] = parse_size(raw_value, what=f"max_memory[{key!r}]")
    return caps


def _device_key(raw: Any) -> DeviceKey:
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    text = str(raw).strip().lower()
    if text in ("cpu", "disk"):
        return text
    match = re.fullmatch(r"(?:cuda:|gpu)?(\d+)", text)
    if not match:
        raise UsageError(f"max_memory: unknown device {raw!r}; use a GPU index (0, 1, ...), cpu or disk")
    return int(match.group(1))


def parse_gpus(spec: str) -> dict[DeviceKey, int]:
    """``"2x80GB"`` (two GPUs of 80 GB), ``"80GiB,48GiB"`` or ``"1x80GB,2x48GB"`` to caps for GPUs 0, 1, ...

    Raises:
        UsageError: malformed text.
    """
    caps: dict[DeviceKey, int] = {}
    for chunk in filter(None, (part.strip() for part in spec.split(","))):
        match = re.match(r"^(\d+)\s*[xX]\s*(.+)$", chunk)
        count_text, sep, size_text = (match.group(1), "x", match.group(2)) if match else ("1", "x", chunk)
        if not sep or not count_text.isdigit() or int(count_text) < 1:
            raise UsageError(f"--gpus: {chunk!r} is not COUNTxSIZE; write it like 2x80GB or 3x48GiB")
        size = parse_size(size_text, what=f"--gpus {chunk!r}")
        for _ in range(int(count_text)):
            caps[len(caps)] = size
    if not caps:
        raise UsageError("--gpus: no GPUs given; write it like 2x80GB or 3x48GiB")
    return caps


# ---------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class PlanOptions:
    """What the headroom is computed for."""

    dtype: torch.dtype = torch.float16
    batch_size: int = 1
    seq_len: int = 2048
    cuda_context_bytes: int = GiB
    kernel: str = "auto"
    allow_disk: bool = False  # an offload folder is available: "disk" takes what does not fit elsewhere


# ----------------------------------------------------------------------------------- model skeleton
@dataclass(frozen=True)
class Block:
    """A unit of placement: an embedding, one decoder layer, the final norm, the head, ..."""

    name: str  # module path, as used in a device map
    weight_bytes: int  # bytes of the tensors it owns (tied tensors count once, at their owner)
    is_layer: bool = False
    is_head: bool = False
    tied_to: str | None = None  # block that owns a tensor this one shares: both go to the same device
    workspace_bytes: int = 0  # the kernel's temporary memory for its largest quantized linear


@dataclass(frozen=True)
class ModelLayout:
    """Everything the placement needs to know about a model."""

    source: str
    arch: ArchSpec
    settings: QuantizeSettings
    blocks: tuple[Block, ...]
    hidden_size: int
    kv_size: int  # key (and value) width per token and layer
    intermediate_size: int
    num_heads: int
    vocab_size: int

    @property
    def total_weight_bytes(self) -> int:
        return sum(block.weight_bytes for block in self.blocks)


def config_from_dict(model_config: dict[str, Any]) -> Any:
    """A transformers config object from a plain dict (a preset's ``model_config``)."""
    from transformers import CONFIG_MAPPING

    model_type = model_config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UsageError(f"model_type {model_type!r} is unknown to transformers")
    try:
        return CONFIG_MAPPING[model_type](**{k: v for k, v in model_config.items() if k != "model_type"})
    except (TypeError, ValueError) as exc:
        raise UsageError(f"model_config of type {model_type!r} is invalid ({exc})") from None


def build_meta_model(config: Any, settings: QuantizeSettings, *, dtype: torch.dtype = torch.float16,
                     quantized: set[str] | None = None, kernel: str = "auto") -> tuple[nn.Module, ArchSpec, list[str]]:
    """The model on the meta device, with its target linears replaced by meta :class:`QuantLinear`.

    Args:
        config: a transformers config.
        settings: the checkpoint's GPTQ settings.
        dtype: dtype of the floating-point tensors.
        quantized: names of the linears to quantize (default: every target linear of the architecture).
        kernel: the QuantLinear kernel.

    Returns:
        (model, architecture, names of the replaced linears).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    arch = get_arch(getattr(config, "model_type", None))
    with init_empty_weights():  # parameters on meta; small buffers (rotary tables) stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.tie_weights()  # init_empty_weights re-creates each parameter, which unties a tied head
    layers = model.get_submodule(arch.layers_path)
    replaced = []
    for index in range(len(layers)):
        for linear_name in arch.quantized_linears:
            path = f"{arch.layers_path}.{index}.{linear_name}"
            if quantized is not None and path not in quantized:
                continue
            _replace_linear(model, path, arch, settings, dtype=dtype, kernel=kernel)
            replaced.append(path)
    return model, arch, replaced


def _replace_linear(model: nn.Module, path: str, arch: ArchSpec, settings: QuantizeSettings, *,
                    dtype: torch.dtype, kernel: str) -> None:
    linear = model.get_submodule(path)
    weight = getattr(linear, "weight", None)
    if weight is None or weight.dim() != 2:
        raise CheckpointError(f"{path}: the architecture table names it as a quantized linear but it is a "
                              f"{type(linear).__name__}; the config does not match the architecture")
    in_features, out_features = (weight.shape[0], weight.shape[1]) if arch.conv1d else (weight.shape[1],
                                                                                        weight.shape[0])
    check_quant_shape(settings.bits, in_features, out_features, what=path)
    layer = QuantLinear(settings.bits, settings.group_size, in_features, out_features,
                        bias=getattr(linear, "bias", None) is not None, checkpoint_format=settings.checkpoint_format,
                        dtype=dtype, device="meta", kernel=kernel)
    layer.name = path
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, layer)


def expected_tensors(model: nn.Module) -> dict[str, nn.Parameter | torch.Tensor]:
    """The persistent tensors of ``model`` by state-dict name (tied tensors appear under every name)."""
    return dict(model.state_dict(keep_vars=True))


def check_against_checkpoint(model: nn.Module, files: CheckpointFiles, *, tied: set[str]) -> None:
    """Raise CheckpointError when the checkpoint's tensors and the config disagree.

    Args:
        model: the meta model (with QuantLinear in place).
        files: the checkpoint's files (headers).
        tied: names that may be missing because they share another tensor (a tied ``lm_head.weight``).
    """
    entries = files.entries
    folder = files.folder
    for name, tensor in expected_tensors(model).items():
        entry = entries.get(name)
        if entry is None:
            if name in tied:
                continue
            raise CheckpointError(f"{folder}: tensor {name!r} is missing from the checkpoint although the config "
                                  f"and quantize_config call for it; the files belong to another model or "
                                  f"another quantization")
        if tuple(entry.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{folder}: tensor {name!r} has shape {tuple(entry.shape)} in the checkpoint but the config and "
                f"quantize_config give {tuple(tensor.shape)}; check bits, group_size and the model config")
        _check_dtype(folder, name, entry.dtype, tensor.dtype)
    known = set(expected_tensors(model))
    extra = sorted(n for n in entries if n not in known and not n.endswith(IGNORED_EXTRA_SUFFIXES))
    if extra:
        raise CheckpointError(f"{folder}: the checkpoint has {len(extra)} tensor(s) the model does not use "
                              f"(first: {extra[0]!r}); the config does not match these weights")


#: safetensors dtype an integer tensor of the model must be stored as (no silent float-to-int casts).
_INTEGER_STORAGE = {torch.int32: "I32", torch.int64: "I64", torch.int16: "I16", torch.int8: "I8",
                    torch.uint8: "U8", torch.bool: "BOOL"}
#: safetensors dtypes a floating-point tensor may be stored as (cast to the load dtype).
_FLOAT_STORAGE = ("F16", "BF16", "F32", "F64")


def _check_dtype(folder: Path, name: str, stored: str, wanted: torch.dtype) -> None:
    """Raise CheckpointError when ``name`` is stored as a dtype that loading would have to cast wrongly."""
    expected = _INTEGER_STORAGE.get(wanted)
    if expected is not None and stored != expected:
        raise CheckpointError(
            f"{folder}: tensor {name!r} is stored as {stored} but must be {expected} (packed integers); the "
            f"checkpoint was written wrongly or converted by a tool that changed its dtype")
    if wanted.is_floating_point and stored not in _FLOAT_STORAGE:
        raise CheckpointError(
            f"{folder}: tensor {name!r} is stored as {stored} but must be a float dtype "
            f"({', '.join(_FLOAT_STORAGE)}); the checkpoint was written wrongly")


def quantized_in_checkpoint(arch: ArchSpec, num_layers: int, files: CheckpointFiles) -> set[str]:
    """Target linears the checkpoint actually holds quantized (``NAME.qweight`` present)."""
    entries = files.entries
    return {f"{arch.layers_path}.{i}.{name}" for i in range(num_layers) for name in arch.quantized_linears
            if f"{arch.layers_path}.{i}.{name}.qweight" in entries}


def tied_names(model: nn.Module) -> dict[str, str]:
    """``{follower: owner}`` for tensors shared under several names (a tied ``lm_head.weight``)."""
    owners: dict[int, str] = {}
    followers: dict[str, str] = {}
    for name, tensor in expected_tensors(model).items():
        owner = owners.setdefault(id(tensor), name)
        if owner != name:
            followers[name] = owner
    return followers


def layout_from_model(model: nn.Module, arch: ArchSpec, settings: QuantizeSettings, *, source: str,
                      kernel: str = "auto") -> ModelLayout:
    """Group ``model``'s tensors into placement blocks in execution order, with their sizes."""
    followers = tied_names(model)
    sizes: dict[str, int] = {}
    order: list[str] = []
    tied_block: dict[str, str] = {}
    tensors = expected_tensors(model)
    # buffers the model computes itself (rotary tables) are placed too, though no checkpoint holds them
    tensors.update({name: buffer for name, buffer in model.named_buffers() if name not in tensors})
    for name, tensor in tensors.items():
        block = block_of(name, arch)
        if block not in sizes:
            sizes[block] = 0
            order.append(block)
        if name in followers:
            tied_block[block] = block_of(followers[name], arch)
        else:
            sizes[block] += tensor.numel() * tensor.element_size()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and settings.desc_act and module.num_groups > 1:
            # act-order: QuantLinear.prepare() adds the int32 input permutation (in_features,)
            sizes[block_of(name + ".qweight", arch)] += module.in_features * 4
    workspace = _workspace_per_block(model, arch, kernel)
    ranked = sorted(order, key=lambda b: _execution_rank(b, arch))
    blocks = tuple(Block(name=b, weight_bytes=sizes[b], is_layer=_layer_index(b, arch) is not None,
                         is_head=b == arch.lm_head, tied_to=tied_block.get(b), workspace_bytes=workspace.get(b, 0))
                   for b in ranked)
    config = model.config
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return ModelLayout(source=source, arch=arch, settings=settings, blocks=blocks, hidden_size=hidden,
                       kv_size=hidden * kv_heads // heads,
                       intermediate_size=int(getattr(config, "intermediate_size", None)
                                             or getattr(config, "ffn_dim", None) or 4 * hidden),
                       num_heads=heads, vocab_size=int(config.vocab_size))


def block_of(tensor_name: str, arch: ArchSpec) -> str:
    """The placement block holding ``tensor_name``: a layer, a named outside module, or its parent."""
    prefix = arch.layers_path + "."
    if tensor_name.startswith(prefix):
        index = tensor_name[len(prefix):].split(".", 1)[0]
        return prefix + index
    for module in sorted(arch.before_layers + arch.after_layers + (arch.lm_head,), key=len, reverse=True):
        if tensor_name == module or tensor_name.startswith(module + "."):
            return module
    return tensor_name.rpartition(".")[0] or tensor_name


def _layer_index(block: str, arch: ArchSpec) -> int | None:
    prefix = arch.layers_path + "."
    return int(block[len(prefix):]) if block.startswith(prefix) and block[len(prefix):].isdigit() else None


def _execution_rank(block: str, arch: ArchSpec) -> tuple[int, int]:
    if block in arch.before_layers:
        return (0, arch.before_layers.index(block))
    index = _layer_index(block, arch)
    if index is not None:
        return (1, index)
    if block in arch.after_layers:
        return (2, arch.after_layers.index(block))
    return (4, 0) if block == arch.lm_head else (3, 0)


def _workspace_per_block(model: nn.Module, arch: ArchSpec, kernel: str) -> dict[str, int]:
    workspace: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            block = block_of(name + ".qweight", arch)
            need = planning_workspace(module, kernel)
            workspace[block] = max(workspace.get(block, 0), need)
    return workspace


# ------------------------------------------------------------------------------------------ result
@dataclass(frozen=True)
class DevicePlan:
    """What one device holds in a placement."""

    device: str  # "0", "1", "cpu", "disk"
    cap_bytes: int | None  # None: unlimited (disk)
    weight_bytes: int = 0
    reserved: dict[str, int] = field(default_factory=dict)
    modules: tuple[str, ...] = ()

    @property
    def reserved_bytes(self) -> int:
        return sum(self.reserved.values())

    @property
    def free_bytes(self) -> int | None:
        return None if self.cap_bytes is None else self.cap_bytes - self.weight_bytes - self.reserved_bytes

    def to_json(self) -> dict[str, Any]:
        return {"cap_bytes": self.cap_bytes, "weight_bytes": self.weight_bytes,
                "reserved_bytes": self.reserved_bytes, "reserved": dict(self.reserved),
                "free_bytes": self.free_bytes, "modules": list(self.modules)}


@dataclass(frozen=True)
class Placement:
    """A planned placement, fitting or not."""

    source: str
    fits: bool
    devices: dict[str, DevicePlan]
    device_map: dict[str, DeviceKey]
    total_weight_bytes: int
    options: PlanOptions
    reason: str = ""
    suggestion: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "fits": self.fits, "total_weight_bytes": self.total_weight_bytes,
                "batch_size": self.options.batch_size, "seq_len": self.options.seq_len,
                "dtype": str(self.options.dtype).removeprefix("torch."),
                "devices": {key: plan.to_json() for key, plan in self.devices.items()},
                "device_map": dict(self.device_map), "reason": self.reason, "suggestion": self.suggestion}

    def raise_if_unfit(self) -> None:
        """Raise :class:`PlacementError` (reason and smallest fix) when the placement does not fit."""
        if not self.fits:
            raise PlacementError(f"{self.source}: {self.reason}; {self.suggestion}")


# --------------------------------------------------------------------------------------- placement
@dataclass
class _DeviceState:
    key: DeviceKey
    cap: int | None
    weight: int = 0
    layers: int = 0
    head: bool = False
    workspace: int = 0
    modules: list[str] = field(default_factory=list)


def activation_bytes(layout: ModelLayout, options: PlanOptions) -> int:
    """Peak activations of one decoder layer's forward for the batch and sequence length of ``options``."""
    tokens = options.batch_size * options.seq_len
    item = torch.empty((), dtype=options.dtype).element_size()
    # residual, norm output, attention output, fused q/k/v and the MLP's hidden (twice: act and input).
    hidden_part = tokens * item * (3 * layout.hidden_size + 3 * layout.hidden_size + 2 * layout.intermediate_size)
    # attention scores (eager attention keeps fp32 scores and probabilities in the compute dtype).
    scores = options.batch_size * layout.num_heads * options.seq_len * options.seq_len * (4 + item)
    return hidden_part + scores


def _reserves(state: _DeviceState, layout: ModelLayout, options: PlanOptions, staging: int) -> dict[str, int]:
    if not isinstance(state.key, int) or (not state.modules and not staging):
        return {}
    item = torch.empty((), dtype=options.dtype).element_size()
    tokens = options.batch_size * options.seq_len
    reserved = {"cuda_context": options.cuda_context_bytes}
    if state.layers or staging:
        reserved["activations"] = activation_bytes(layout, options)
        reserved["kernel_workspace"] = state.workspace
    if state.layers:
        reserved["kv_cache"] = state.layers * 2 * tokens * layout.kv_size * item
    if state.head:
        reserved["output_logits"] = tokens * layout.vocab_size * 4
    if staging:
        reserved["offload_staging"] = staging
    return reserved


def _units(layout: ModelLayout) -> list[list[Block]]:
    """Blocks grouped so that a tied follower (a tied head) travels with the block that owns its weight."""
    units: dict[str, list[Block]] = {}
    for block in layout.blocks:
        if block.tied_to is None or block.tied_to not in {b.name for b in layout.blocks}:
            units[block.name] = [block]
    for block in layout.blocks:
        if block.name not in units:
            units[block.tied_to or ""].append(block)
    return list(units.values())


def _fill(layout: ModelLayout, caps: list[tuple[DeviceKey, int | None]], options: PlanOptions,
          staging: int) -> tuple[list[_DeviceState], Block | None]:
    states = [_DeviceState(key, cap) for key, cap in caps]
    main = next((s for s in states if isinstance(s.key, int)), None)
    current = 0
    for unit in _units(layout):
        while current < len(states):
            state = states[current]
            trial = replace(state, weight=state.weight + sum(b.weight_bytes for b in unit),
                            layers=state.layers + sum(b.is_layer for b in unit),
                            head=state.head or any(b.is_head for b in unit),
                            workspace=max([state.workspace] + [b.workspace_bytes for b in unit]),
                            modules=state.modules + [b.name for b in unit])
            need = trial.weight + sum(_reserves(trial, layout, options, staging if state is main else 0).values())
            if trial.cap is None or need <= trial.cap:
                states[current] = trial
                if state is main:
                    main = trial
                break
            current += 1
        else:
            return states, unit[0]
    return states, None


def place_layout(layout: ModelLayout, max_memory: Mapping[DeviceKey, int],
                 options: PlanOptions | None = None) -> Placement:
    """Place ``layout`` on the devices of ``max_memory`` (GPUs in index order, then cpu, then disk).

    Returns a :class:`Placement` whether it fits or not; ``fits=False`` comes with the reason and the
    smallest change of the caps that would fit.
    """
    options = options or PlanOptions()
    caps = _ordered_caps(max_memory, options)
    if not caps:
        raise UsageError("max_memory names no device; give at least one, like 0=24GiB or cpu=64GiB")
    states, failed, staging = _fill_with_staging(layout, caps, options)
    devices = {str(s.key): DevicePlan(device=str(s.key), cap_bytes=s.cap, weight_bytes=s.weight,
                                      reserved=_reserves(s, layout, options, staging if s is _main(states) else 0),
                                      modules=tuple(s.modules))
               for s in states}
    device_map = {name: s.key for s in states for name in s.modules}
    if failed is None:
        return Placement(layout.source, True, devices, device_map, layout.total_weight_bytes, options)
    placed_bytes = sum(s.weight for s in states)
    reason = (f"the model does not fit: {format_size(layout.total_weight_bytes - placed_bytes)} of "
              f"{format_size(layout.total_weight_bytes)} weights have no room, starting with {failed.name} "
              f"({format_size(failed.weight_bytes)}) (caps include headroom for batch {options.batch_size} x "
              f"{options.seq_len} tokens)")
    return Placement(layout.source, False, devices, device_map, layout.total_weight_bytes, options,
                     reason=reason, suggestion=_smallest_fix(layout, caps, options))


def _main(states: list[_DeviceState]) -> _DeviceState | None:
    return next((s for s in states if isinstance(s.key, int)), None)


def _ordered_caps(max_memory: Mapping[DeviceKey, int], options: PlanOptions) -> list[tuple[DeviceKey, int | None]]:
    gpus = sorted(k for k in max_memory if isinstance(k, int))
    caps: list[tuple[DeviceKey, int | None]] = [(k, int(max_memory[k])) for k in gpus]
    if "cpu" in max_memory:
        caps.append(("cpu", int(max_memory["cpu"])))
    if options.allow_disk or "disk" in max_memory:
        caps.append(("disk", None if "disk" not in max_memory else int(max_memory["disk"])))
    return caps


def _fill_with_staging(layout: ModelLayout, caps: list[tuple[DeviceKey, int | None]],
                       options: PlanOptions) -> tuple[list[_DeviceState], Block | None, int]:
    """Fill; when modules land on cpu/disk, reserve staging for the largest of them on the main GPU."""
    staging = 0
    for _ in range(4):
        states, failed = _fill(layout, caps, options, staging)
        if not any(isinstance(k, int) for k, _ in caps):
            return states, failed, 0
        offloaded = [b.weight_bytes for s in states if not isinstance(s.key, int) for b in layout.blocks
                     if b.name in s.modules]
        needed = max(offloaded, default=0)
        if needed <= staging:
            return states, failed, staging
        staging = needed
    return states, failed, staging


def _smallest_fix(layout: ModelLayout, caps: list[tuple[DeviceKey, int | None]], options: PlanOptions) -> str:
    """The smallest raise of the last device's cap that fits, and the CPU offload that would: found to the byte
    (a bisection over bytes, not steps), then written rounded *up* so the printed cap is enough."""
    limit = layout.total_weight_bytes * 2 + 64 * GiB

    def fits_with(index: int, extra: int, base: list[tuple[DeviceKey, int | None]]) -> bool:
        trial = list(base)
        key, cap = trial[index]
        trial[index] = (key, (cap or 0) + extra)
        return _fill_with_staging(layout, trial, options)[1] is None

    def search(index: int, base: list[tuple[DeviceKey, int | None]]) -> int | None:
        if not fits_with(index, limit, base):
            return None
        low, high = 0, limit
        while low < high:
            middle = (low + high) // 2
            if fits_with(index, middle, base):
                high = middle
            else:
                low = middle + 1
        return low

    last = max((i for i, (k, _) in enumerate(caps) if isinstance(k, int)), default=len(caps) - 1)
    hints = []
    extra = search(last, caps)
    if extra is not None:
        key, cap = caps[last]
        hints.append(f"raise {_label(key)} to {size_arg_at_least((cap or 0) + extra)} (+{format_size(extra)}; "
                     f"{(cap or 0) + extra} bytes exactly)")
    if not any(k == "cpu" for k, _ in caps):
        with_cpu = [c for c in caps if c[0] != "disk"] + [("cpu", 0)]
        cpu_extra = search(len(with_cpu) - 1, with_cpu)
        if cpu_extra is not None:
            hints.append(f"or offload to the CPU with cpu={size_arg_at_least(cpu_extra)} (slower)")
    return "smallest change that fits: " + (" ".join(hints) if hints else
                                            "none found; use more or larger devices")


def _label(key: DeviceKey) -> str:
    return f"GPU {key}" if isinstance(key, int) else key


# ------------------------------------------------------------------------------------------ sources
def plan_placement(source: str | Path, *, max_memory: str | Mapping[Any, Any],
                   options: PlanOptions | None = None, branch: str | None = None) -> Placement:
    """Plan the placement of a checkpoint folder or a preset on the devices of ``max_memory``.

    Reads only ``config.json``, the quantization settings and the safetensors headers (a preset without
    files: its model config and quantization settings); builds the model on the meta device.

    Args:
        source: a checkpoint folder, ``PRESET[:BRANCH]``, or a downloaded ``NAMESPACE/NAME[:BRANCH]``.
        max_memory: caps per device (``"0=60GiB,1=79GiB"`` or a dict; bare numbers are bytes).
        options: batch size, sequence length, dtype, CUDA context size, kernel, disk offload.
        branch: the preset branch whose quantization settings apply (default: the preset's default).

    Returns:
        The :class:`Placement` (``fits`` tells whether it fits; nothing raises for a misfit).

    Raises:
        UsageError: malformed caps, an unknown preset or branch.
        PathNotFoundError, NotAFolderError: a missing path, or a file where the checkpoint folder is needed.
        CheckpointError: the config and the checkpoint's tensors disagree, missing shards, ...
    """
    options = options or PlanOptions()
    layout, _ = load_layout(source, options=options, branch=branch)
    return place_layout(layout, parse_max_memory(max_memory), options)


def load_layout(source: str | Path, *, options: PlanOptions,
                branch: str | None = None) -> tuple[ModelLayout, CheckpointFiles | None]:
    """The :class:`ModelLayout` of a checkpoint folder, a preset (``PRESET[:BRANCH]``) or a downloaded
    repository (``NAMESPACE/NAME[:BRANCH]``), and the folder's files (None for a preset).

    Raises:
        PathNotFoundError, NotAFolderError: a missing path, or a file where the folder is needed.
        UsageError: an unknown preset or branch.
    """
    from ..checkpoint.presets import resolve_model

    resolved = resolve_model(source, revision=branch, need_folder=False)
    if resolved.folder is not None:
        folder = resolved.folder
        model, arch, settings, files = build_checkpoint_model(folder, dtype=options.dtype, kernel=options.kernel)
        return layout_from_model(model, arch, settings, source=str(folder), kernel=options.kernel), files
    spec = resolved.spec
    preset = spec.preset if spec is not None else None
    if spec is None or preset is None:
        raise UsageError(f"{source!r} names no preset and no checkpoint folder")
    if not preset.model_config:
        raise UsageError(f"preset {preset.name!r} has no model_config; plan a downloaded checkpoint folder instead")
    branch_info = preset.branches.get(spec.revision)
    if branch_info is None:
        raise UsageError(f"preset {preset.name!r} has no branch {spec.revision!r}; known: {', '.join(preset.branches)}")
    settings = settings_from_dict(branch_info.get("quantize_config", {}), source=f"preset {preset.name}")
    validate_model_config(preset.model_config, source=f"preset {preset.name} model_config")
    model, arch, _ = build_meta_model(config_from_dict(preset.model_config), settings, dtype=options.dtype,
                                      kernel=options.kernel)
    return layout_from_model(model, arch, settings, source=f"preset {preset.name}", kernel=options.kernel), None


def read_model_config(folder: Path) -> dict[str, Any]:
    """``folder``'s ``config.json``, checked (sizes, model code) before anything reads it or builds from it.

    Raises:
        CheckpointError: no config.json, or one with impossible sizes.
        UnsafeCheckpointError, UnsupportedArchitectureError: see
            :func:`gptq_tools.checkpoint.config_check.check_model_code`.
    """
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json; the folder is not a model checkpoint")
    raw_config = read_json(folder / "config.json")
    validate_model_config(raw_config, source=str(folder / "config.json"))
    return raw_config


def build_checkpoint_model(folder: Path, *, dtype: torch.dtype, kernel: str = "auto",
                           allow_pickle: bool = False
                           ) -> tuple[nn.Module, ArchSpec, QuantizeSettings, CheckpointFiles]:
    """Meta model for the checkpoint in ``folder``, checked against its safetensors headers."""
    from transformers import AutoConfig

    raw_config = read_model_config(folder)  # sizes and model code checked before a model is built from them
    settings = read_quantize_settings(folder)
    files = find_checkpoint_files(folder, base_name=settings.model_file_base_name, allow_pickle=allow_pickle)
    try:  # parsing only: nothing is sized from the config yet
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (TypeError, KeyError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: transformers cannot read it ({exc}); the config is "
                              f"corrupt") from None
    arch = get_arch(getattr(config, "model_type", None), source=str(folder))
    if files.layout != "pickle":
        check_config_against_headers(raw_config, arch, files.entries, source=str(folder))
    quantized = None
    if files.layout != "pickle":
        num_layers = _num_layers(config)
        quantized = quantized_in_checkpoint(arch, num_layers, files)
        if not quantized:
            raise CheckpointError(f"{folder}: no quantized linear (no '*.qweight' tensor) in the checkpoint; "
                                  f"it is not a GPTQ checkpoint")
    model, arch, _ = build_meta_model(config, settings, dtype=dtype, quantized=quantized, kernel=kernel)
    if files.layout != "pickle":
        check_against_checkpoint(model, files, tied=set(tied_names(model)))
    return model, arch, settings, files


def _num_layers(config: Any) -> int:
    for attribute in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    raise CheckpointError("config.json gives no layer count (num_hidden_layers)")
