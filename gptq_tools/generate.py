"""Talk to a GPTQ model: load it across the devices (see :mod:`gptq_tools.load`) and generate text."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    """The text a model produced and how fast."""

    prompt: str
    text: str  # the new text only (the prompt is not repeated)
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def load_tokenizer(folder: str | os.PathLike[str], *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with the checkpoint in ``folder``.

    Raises:
        CheckpointError: the folder has no tokenizer files.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((folder / name).is_file() for name in names):
        raise CheckpointError(f"{folder}: no tokenizer files ({', '.join(names)}); copy the original model's "
                              f"tokenizer into the checkpoint folder")
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the device of the input embedding (its execution device when offloaded)."""
    weight = model.get_input_embeddings().weight
    if weight.device.type != "meta":
        return weight.device
    hook = getattr(model.get_input_embeddings(), "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device if not isinstance(device, int) else f"cuda:{device}") if device is not None else \
        torch.device("cpu")


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64,
                  do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
                  seed: int | None = None) -> GenerationResult:
    """Generate a continuation of ``prompt``.

    Args:
        model: a loaded model (:func:`gptq_tools.load_quantized`).
        tokenizer: its tokenizer (:func:`load_tokenizer`).
        prompt: the text, in the model's prompt format.
        max_new_tokens: most tokens to add.
        do_sample: sample (with ``temperature``/``top_p``) instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling threshold.
        seed: random seed for sampling.

    Raises:
        UsageError: an empty prompt or a non-positive ``max_new_tokens``.
    """
    if not prompt:
        raise UsageError("the prompt is empty; pass the text to continue, e.g. --prompt \"Translate to English: ...\"")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if seed is not None:
        torch.manual_seed(seed)
    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids = encoded["input_ids"].to(input_device(model))
    attention_mask = encoded.get("attention_mask")
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        options["pad_token_id"] = tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=None if attention_mask is None else
                                attention_mask.to(input_ids.device), **options)
    seconds = time.perf_counter() - started
    new = output[0, input_ids.shape[1]:]
    return GenerationResult(prompt=prompt, text=tokenizer.decode(new, skip_special_tokens=True),
                            new_tokens=int(new.numel()), seconds=seconds)


def generate(path: str | os.PathLike[str], prompt: str, *, max_new_tokens: int = 64,
             max_memory: str | Mapping[Any, Any] | None = None, dtype: torch.dtype = torch.float16,
             offload_folder: str | os.PathLike[str] | None = None, do_sample: bool = False,
             seed: int | None = None, trust_remote_code: bool = False, **load_options: Any) -> GenerationResult:
    """Load the checkpoint in ``path`` and generate a continuation of ``prompt`` (one call, one answer).

    Other keyword arguments go to :func:`gptq_tools.load.load_quantized`.
    """
    from .load import load_quantized

    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_quantized(path, max_memory=max_memory, dtype=dtype, offload_folder=offload_folder,
                           trust_remote_code=trust_remote_code, **load_options)
    return generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed)
