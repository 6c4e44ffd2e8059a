"""Talk to a GPTQ model: load it across the devices (see :mod:`gptq_tools.runtime.load`) and generate text."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TextStreamer

from ..errors import CheckpointError, UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    """The text a model produced and how fast."""

    prompt: str
    text: str  # the new text only (the prompt is not repeated)
    new_tokens: int
    seconds: float
    token_ids: tuple[int, ...] = ()  # the new tokens' ids (text alone can hide them: special or unknown ids)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
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
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the device of the input embedding (its execution device when offloaded)."""
    weight = model.get_input_embeddings().weight
    if weight.device.type != "meta":
        return weight.device
    hook = getattr(model.get_input_embeddings(), "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device if not isinstance(device, int) else f"cuda:{device}") if device is not None else \
        torch.device("cpu")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (the default), or sampled with the usual knobs.

    ``temperature=0`` is greedy even with ``do_sample``; ``top_k=0`` and ``top_p=1`` switch those filters
    off (``top_k=50`` is transformers' default); ``repetition_penalty`` (1 = off, >1 discourages repeats)
    applies to greedy decoding too.
    """

    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        """Raises :class:`UsageError` naming the option that is out of range."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"--temperature {self.temperature} must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p {self.top_p} must be in (0, 1]; 1 switches it off")
        if self.top_k < 0:
            raise UsageError(f"--top-k {self.top_k} must be 0 (off) or more")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UsageError(f"--repetition-penalty {self.repetition_penalty} must be positive; 1 switches it off")

    def generate_options(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate`` (every knob explicit, so a model's generation_config
        cannot switch on a filter that was not asked for)."""
        options: dict[str, Any] = {"repetition_penalty": self.repetition_penalty}
        if self.do_sample and self.temperature > 0:
            options.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return options


class _CallbackStreamer(TextStreamer):  # type: ignore[misc]
    """transformers' streamer (word-boundary buffering, multi-byte safe), handing text to a callback
    instead of printing it: the library never prints."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._on_text(text)


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64,
                  sampling: Sampling | None = None, on_text: Callable[[str], None] | None = None
                  ) -> GenerationResult:
    """Generate a continuation of ``prompt``.

    Args:
        model: a loaded model (:func:`gptq_tools.load_quantized`).
        tokenizer: its tokenizer (:func:`load_tokenizer`).
        prompt: the text, in the model's prompt format.
        max_new_tokens: most tokens to add.
        sampling: greedy (default) or sampling settings, see :class:`Sampling`.
        on_text: called with each piece of new text as soon as it is decoded (streaming); the pieces
            joined are ``result.text``.

    Raises:
        UsageError: an empty prompt, a non-positive ``max_new_tokens`` or a sampling setting out of range.
    """
    sampling = sampling or Sampling()
    sampling.check()
    if not prompt:
        raise UsageError("the prompt is empty; pass the text to continue, e.g. --prompt \"Translate to English: ...\"")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids = encoded["input_ids"].to(input_device(model))
    attention_mask = encoded.get("attention_mask")
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, **sampling.generate_options()}
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        options["pad_token_id"] = tokenizer.eos_token_id
    if on_text is not None:
        options["streamer"] = _CallbackStreamer(tokenizer, on_text)
    started = time.perf_counter()
    with torch.no_grad():  # not inference_mode: its tensors have no version counter, which SharedInput needs
        output = model.generate(input_ids=input_ids, attention_mask=None if attention_mask is None else
                                attention_mask.to(input_ids.device), **options)
    seconds = time.perf_counter() - started
    new = output[0, input_ids.shape[1]:]
    return GenerationResult(prompt=prompt, text=tokenizer.decode(new, skip_special_tokens=True),
                            new_tokens=int(new.numel()), seconds=seconds, token_ids=tuple(new.tolist()))


def generate_each(model: nn.Module, tokenizer: Any, prompts: Iterable[str], *, max_new_tokens: int = 64,
                  sampling: Sampling | None = None, on_text: Callable[[str], None] | None = None
                  ) -> Iterator[GenerationResult]:
    """Answer each prompt in turn with one loaded model (the interactive mode reads them from stdin).

    Blank prompts are skipped; a trailing newline is not part of a prompt. The other arguments are those
    of :func:`generate_text`.
    """
    for line in prompts:
        prompt = line.rstrip("\r\n")
        if prompt.strip():
            yield generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                                on_text=on_text)


def load_for_generation(path: str | os.PathLike[str], *, max_memory: str | Mapping[Any, Any] | None = None,
                        dtype: torch.dtype = torch.float16, offload_folder: str | os.PathLike[str] | None = None,
                        **load_options: Any) -> tuple[nn.Module, Any]:
    """Load the tokenizer and the model of ``path``: a checkpoint folder, or ``PRESET[:BRANCH]`` /
    ``NAMESPACE/NAME[:BRANCH]`` standing for the folder ``gptq-tools download`` put it in.

    A preset's published SHA256 then applies to the weights. Other keyword arguments go to
    :func:`gptq_tools.runtime.load.load_quantized`.

    Raises:
        PathNotFoundError, NotAFolderError: a missing path, or a file where the checkpoint folder is needed.
        CheckpointError: no tokenizer files in the folder (and everything :func:`load_quantized` raises).
    """
    from ..checkpoint.presets import resolve_model
    from .load import load_quantized
    from .plan import read_model_config

    resolved = resolve_model(path, need_folder=True)
    folder = resolved.folder if resolved.folder is not None else Path(path)
    if resolved.spec is not None and resolved.spec.preset is not None:
        load_options.setdefault("preset", resolved.spec.preset.name)
    read_model_config(folder)  # a config transformers cannot load is refused before the tokenizer reads it
    tokenizer = load_tokenizer(folder)
    model = load_quantized(folder, max_memory=max_memory, dtype=dtype, offload_folder=offload_folder,
                           **load_options)
    return model, tokenizer


def generate(path: str | os.PathLike[str], prompt: str, *, max_new_tokens: int = 64,
             max_memory: str | Mapping[Any, Any] | None = None, dtype: torch.dtype = torch.float16,
             offload_folder: str | os.PathLike[str] | None = None, sampling: Sampling | None = None,
             on_text: Callable[[str], None] | None = None,
             **load_options: Any) -> GenerationResult:
    """Load the model of ``path`` (see :func:`load_for_generation`) and generate a continuation of ``prompt``
    (one call, one answer). Other keyword arguments go to :func:`gptq_tools.runtime.load.load_quantized`.
    """
    model, tokenizer = load_for_generation(path, max_memory=max_memory, dtype=dtype, offload_folder=offload_folder,
                                           **load_options)
    return generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, sampling=sampling, on_text=on_text)
