"""gptq-tools: take very large GPTQ models from the Hub to GPUs, and make new GPTQ checkpoints.

The public API is importable from here (``gptq_tools.join_parts``, ``gptq_tools.verify``, ...); modules
are imported on first use so that ``import gptq_tools`` stays cheap (no torch import for file work).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

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
    "read_header": "safetensors_format",
    "load_preset": "presets", "list_presets": "presets",
    "get_arch": "architectures",
    "pack_qweight": "packing", "pack_qzeros": "packing", "dequantize": "packing",
    "set_progress": "progress",
    # files: join, verify, split, reshard, inspect
    "join_parts": "join", "JoinResult": "join",
    "verify_files": "verify", "verify_parts": "verify", "FileCheck": "verify",
    "check_manifests": "verify", "hash_files": "verify", "verify_remote": "verify_remote",
    "split_file": "split", "reshard_file": "split",
    "find_part_set": "parts", "MultiPartReader": "parts",
    "parse_manifest": "manifest", "write_manifest": "manifest",
    "validate_checkpoint": "checkpoint",
    "inspect_path": "inspect_path",
    # hub download
    "download": "hub", "plan_download": "hub", "resolve_repo": "hub", "DownloadResult": "hub",
    "DownloadPlan": "hub", "TransferOptions": "hub",
    # plan / load / generate
    "plan_placement": "plan", "parse_max_memory": "plan", "parse_gpus": "plan", "PlanOptions": "plan",
    "Placement": "plan", "load_quantized": "load", "QuantLinear": "qlinear", "register_kernel": "qlinear",
    "available_kernels": "qlinear", "generate": "generate", "generate_text": "generate",
    "load_tokenizer": "generate", "Sampling": "generate", "load_for_generation": "generate",
    "generate_each": "generate", "parse_model_spec": "presets", "resolve_model": "presets",
    # quantizer
    "QuantizeConfig": "quant.config", "quantize_model": "quant.driver", "QuantizeSummary": "quant.driver",
    "LinearReport": "quant.driver", "gptq_quantize": "quant.gptq", "rtn_quantize": "quant.rtn",
    "HessianAccumulator": "quant.gptq", "load_calibration": "quant.calibration",
    "build_tiny_model": "tiny", "load_for_eval": "quant.evaluate", "folder_perplexity": "quant.evaluate",
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
