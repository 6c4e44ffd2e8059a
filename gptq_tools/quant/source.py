"""Streaming access to a source model: an empty (meta) skeleton plus tensors read one module at a time.

The fp16 model is never materialised whole: the skeleton is built on the meta device, and a module's
parameters are read from the source safetensors (``safe_open``) onto the compute device only while it
is needed, then put back on meta.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.architectures import ArchSpec, get_arch
from ..checkpoint.config_check import validate_model_config
from ..checkpoint.model_files import read_json, read_weight_map
from ..errors import CheckpointError, QuantizationError

logger = logging.getLogger(__name__)


class SourceModel:
    """A Hugging Face model folder opened for streaming.

    Attributes:
        folder: the model folder.
        config: the transformers config.
        spec: the architecture table entry.
        model: the skeleton (parameters on meta until loaded).
    """

    def __init__(self, folder: Path, *, dtype: torch.dtype) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = folder
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: no config.json; give a Hugging Face model folder")
        raw_config = read_json(folder / "config.json")
        _refuse_quantized(folder, raw_config)
        validate_model_config(raw_config, source=str(folder / "config.json"))  # before sizing a model from it
        self.spec: ArchSpec = get_arch(raw_config.get("model_type"), source=str(folder))
        self.config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        self.dtype = dtype
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype, trust_remote_code=False)
        self.model.eval()
        self._weight_map = self._read_weight_map()
        self._handles: dict[str, Any] = {}
        self.base_prefix = self.spec.layers_path.split(".")[0]

    def _read_weight_map(self) -> dict[str, str]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            return read_weight_map(index)  # shard names validated: they come with the download
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no .safetensors weights; convert the model to safetensors first")
        from safetensors import safe_open

        weight_map = {}
        for path in files:
            with safe_open(str(path), "pt") as handle:
                weight_map.update({key: path.name for key in handle.keys()})  # noqa: SIM118
        return weight_map

    def source_name(self, name: str) -> str | None:
        """The checkpoint key of model tensor ``name`` (some checkpoints drop the base model prefix)."""
        if name in self._weight_map:
            return name
        prefix = self.base_prefix + "."
        if name.startswith(prefix) and name[len(prefix):] in self._weight_map:
            return name[len(prefix):]
        return None

    def has(self, name: str) -> bool:
        """Whether the source checkpoint holds tensor ``name``."""
        return self.source_name(name) is not None

    def read(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` from the source (CPU, stored dtype); a tied ``lm_head`` reads the embedding.

        Raises:
            CheckpointError: the tensor is missing.
            QuantizationError: it holds NaN or inf.
        """
        from safetensors import safe_open

        key = self.source_name(self.checkpoint_name(name))
        if key is None and name in self.head_names() and self.spec.input_embedding:
            key = self.source_name(f"{self.spec.input_embedding}.weight")
        if key is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the source checkpoint")
        file = self._weight_map[key]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), "pt")
        tensor = self._handles[file].get_tensor(key)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise QuantizationError(f"{self.folder / file}: tensor {key!r} contains NaN or inf; the source "
                                    f"checkpoint is damaged, re-download or re-export it")
        return tensor

    def load_module(self, path: str, device: torch.device) -> torch.nn.Module:
        """Put the parameters of module ``path`` on ``device`` (in the compute dtype), read from the source."""
        from accelerate.utils import set_module_tensor_to_device

        module = self.model.get_submodule(path)
        for name, _ in module.named_parameters():
            value = self.read(f"{path}.{name}").to(self.dtype)
            set_module_tensor_to_device(self.model, f"{path}.{name}", device, value=value)
        for name, _ in module.named_buffers():
            set_module_tensor_to_device(self.model, f"{path}.{name}", device)
        return module

    def unload_module(self, path: str) -> None:
        """Put module ``path``'s parameters back on meta (frees their memory) and close the source files.

        A ``safe_open`` handle maps its whole file, and every tensor read through it stays resident in
        that mapping while the handle is open: kept for the whole run, the process's resident memory grew
        by each layer's fp16 bytes until it held the entire source. The next module opens a fresh one.
        """
        from accelerate.utils import set_module_tensor_to_device

        module = self.model.get_submodule(path)
        for name, _ in module.named_parameters():
            set_module_tensor_to_device(self.model, f"{path}.{name}", "meta")
        self._handles.clear()

    def existing_modules(self, paths: tuple[str, ...]) -> list[str]:
        """Those of ``paths`` that exist in this model (optional modules such as OPT's project_in may be None)."""
        found = []
        for path in paths:
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                continue
            if module is not None:
                found.append(path)
        return found

    def max_length(self) -> int | None:
        """The longest sequence the model accepts (None when unbounded, as with ALiBi)."""
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def num_layers(self) -> int:
        return len(self.model.get_submodule(self.spec.layers_path))

    def head_names(self) -> tuple[str, str]:
        """The output head's weight as the model names it and as checkpoints of this family name it."""
        return "lm_head.weight", f"{self.spec.lm_head}.weight"

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint name of model tensor ``name`` (transformers 5 calls GPT-NeoX's ``embed_out`` ``lm_head``)."""
        model_head, family_head = self.head_names()
        return family_head if name == model_head else name

    def outer_tensor_names(self) -> list[str]:
        """State-dict names outside the decoder layers, in model order (``lm_head.weight`` always included)."""
        layers_prefix = self.spec.layers_path + "."
        names = [name for name in self.model.state_dict() if not name.startswith(layers_prefix)]
        names = [name for name in names if name not in self.head_names()]
        names.append(self.head_names()[0])
        return names


def _refuse_quantized(folder: Path, raw_config: dict[str, Any]) -> None:
    """GPTQ needs the fp16 weights: a checkpoint that is already quantized has none to start from."""
    settings = raw_config.get("quantization_config")
    if settings or (folder / "quantize_config.json").is_file():
        method = settings.get("quant_method", "gptq") if isinstance(settings, dict) else "gptq"
        raise CheckpointError(f"{folder}: already a quantized checkpoint ({method}: quantize_config.json or "
                              f"quantization_config in config.json); quantize the fp16 model it came from instead")
