"""gptq-tools: take very large GPTQ models from the Hub to GPUs, and make new GPTQ checkpoints.

The public API is importable from here (``gptq_tools.join_parts``, ``gptq_tools.verify_files``, ...); modules
are imported on first use so that ``import gptq_tools`` stays cheap (no torch import for file work).
"""

from __future__ import annotations

import importlib
from typing import Any

from .constants import __version__

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # errors
    "GptqToolsError": "errors", "ChecksumMismatchError": "errors", "PartSetError": "errors",
    "ManifestError": "errors", "OutputExistsError": "errors", "InsufficientSpaceError": "errors",
    "LfsPointerError": "errors", "SafetensorsFormatError": "errors", "CheckpointError": "errors",
    "UnsupportedArchitectureError": "errors", "CalibrationError": "errors", "QuantizationError": "errors",
    "HubError": "errors", "IncompleteDownloadError": "errors", "PlacementError": "errors",
    "UnsafeCheckpointError": "errors", "UsageError": "errors",
    "RepoNotFoundError": "errors", "RevisionNotFoundError": "errors", "HubAuthError": "errors",
    # foundation
    "parse_size": "units", "format_size": "units",
    "read_header": "files.safetensors_format",
    "load_preset": "checkpoint.presets", "list_presets": "checkpoint.presets",
    "get_arch": "checkpoint.architectures",
    "pack_qweight": "checkpoint.packing", "pack_qzeros": "checkpoint.packing", "dequantize": "checkpoint.packing",
    "set_progress": "progress",
    # files: join, verify, split, reshard, inspect
    "join_parts": "files.join", "JoinResult": "files.join",
    "verify_files": "files.verify", "verify_parts": "files.verify", "FileCheck": "files.verify",
    "check_manifests": "files.verify", "hash_files": "files.verify", "verify_remote": "hub.verify_remote",
    "split_file": "files.split", "reshard_file": "files.split",
    "find_part_set": "files.parts", "MultiPartReader": "files.parts",
    "parse_manifest": "files.manifest", "write_manifest": "files.manifest",
    "validate_checkpoint": "checkpoint.validate",
    "inspect_path": "checkpoint.inspect",
    # hub download
    "download": "hub", "plan_download": "hub", "resolve_repo": "hub", "DownloadResult": "hub",
    "DownloadPlan": "hub", "TransferOptions": "hub", "publish": "hub.publish", "PublishResult": "hub.publish",
    # plan / load / generate
    "plan_placement": "runtime.plan", "parse_max_memory": "runtime.plan", "parse_gpus": "runtime.plan",
    "PlanOptions": "runtime.plan", "Placement": "runtime.plan", "load_quantized": "runtime.load",
    "QuantLinear": "runtime.qlinear", "register_kernel": "runtime.qlinear",
    "available_kernels": "runtime.qlinear", "generate": "runtime.generate", "generate_text": "runtime.generate",
    "load_tokenizer": "runtime.generate", "Sampling": "runtime.generate", "load_for_generation": "runtime.generate",
    "generate_each": "runtime.generate", "parse_model_spec": "checkpoint.presets",
    "resolve_model": "checkpoint.presets",
    # quantizer
    "QuantizeConfig": "quant.config", "quantize_model": "quant.driver", "QuantizeSummary": "quant.driver",
    "LinearReport": "quant.driver", "gptq_quantize": "quant.gptq", "rtn_quantize": "quant.rtn",
    "HessianAccumulator": "quant.gptq", "load_calibration": "quant.calibration",
    "build_tiny_model": "checkpoint.tiny", "load_for_eval": "quant.evaluate", "folder_perplexity": "quant.evaluate",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gptq_tools' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
