"""Calibration data from local files: ``.txt``, ``.jsonl``, or already tokenized ``.safetensors``/``.pt``.

Text is tokenized as one stream; ``nsamples`` windows of ``seqlen`` tokens are drawn at seeded random
offsets (as the GPTQ paper's samplers do), so the same file, tokenizer and seed give the same batch.
Tokenized files hold an integer tensor ``input_ids`` of shape (n, L) or (L,); rows of exactly
``seqlen`` tokens are used as they are, anything else is treated as one stream.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)
TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: not UTF-8 text (byte {exc.start}); convert it or pass a tokenized "
                               f".safetensors file") from exc


def _read_jsonl(path: Path) -> str:
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be an object "
                                   f"with a \"text\" field") from exc
        text = record.get("text") if isinstance(record, dict) else record if isinstance(record, str) else None
        if not isinstance(text, str):
            raise CalibrationError(f"{path}:{number}: no string \"text\" field; each line must be an object "
                                   f"with a \"text\" field")
        texts.append(text)
    return "\n\n".join(texts)


def _read_tokens(path: Path) -> torch.Tensor:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CalibrationError(f"{path}: cannot read as safetensors ({exc})") from exc
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CalibrationError(f"{path}: cannot read as a tensor file ({type(exc).__name__}: {exc})") from exc
    ids = tensors.get("input_ids") if isinstance(tensors, dict) else tensors
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() not in (1, 2):
        raise CalibrationError(f"{path}: expected an integer tensor 'input_ids' of shape (n, L) or (L,)")
    return ids.to(torch.long)


def check_token_ids(ids: torch.Tensor, vocab_size: int, *, calibration: str | Path, model: str | Path) -> None:
    """Refuse token ids the model's embedding has no row for (a file tokenized for another model).

    Raises:
        CalibrationError: an id is negative or not below ``vocab_size`` (the message names the first one).
    """
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise CalibrationError(
            f"{calibration}: token id {bad} is outside the vocabulary of {model} ({vocab_size} ids, 0 to "
            f"{vocab_size - 1}); the calibration was tokenized for another model: tokenize it with this "
            f"model's tokenizer")


def read_token_ids(path: str | Path, tokenizer: Any, *, min_tokens: int = 1) -> torch.Tensor:
    """All the tokens of a calibration or evaluation file, in order, as one int64 tensor (1-D): text (``.txt``,
    ``.jsonl`` with a ``"text"`` field per line) through ``tokenizer``, or token ids (``.safetensors``, ``.pt``).

    Raises:
        CalibrationError: a folder, a missing, empty or unreadable file, or an unknown format.
    """
    path = Path(path)
    if path.is_dir():
        raise CalibrationError(f"{path} is a folder; give one calibration file in it (.txt, .jsonl, .safetensors "
                               f"or .pt), e.g. {path}/train.txt")
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    suffix = path.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        return _read_tokens(path).reshape(-1)
    if suffix in TEXT_SUFFIXES or suffix in JSONL_SUFFIXES:
        text = _read_jsonl(path) if suffix in JSONL_SUFFIXES else _read_text(path)
        if not text.strip():
            raise CalibrationError(f"{path}: calibration file is empty; give a file with at least {min_tokens} "
                                   f"tokens of text")
        return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    raise CalibrationError(f"{path}: unknown calibration format {path.suffix!r}; use .txt, .jsonl, "
                           f".safetensors or .pt")


def load_calibration(path: str | Path, tokenizer: Any, *, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Read calibration data and return ``nsamples`` token windows of ``seqlen`` tokens.

    Args:
        path: ``.txt``/``.md``, ``.jsonl`` (a ``"text"`` field per line), ``.safetensors`` or ``.pt``
            (integer ``input_ids``).
        tokenizer: a transformers tokenizer (used for text files only).
        nsamples: windows to draw.
        seqlen: tokens per window.
        seed: seeds the window offsets.

    Returns:
        int64 tensor (nsamples, seqlen).

    Raises:
        CalibrationError: missing, empty, unreadable, unknown format, or fewer than ``seqlen`` tokens.
    """
    path = Path(path)
    if path.suffix.lower() in TENSOR_SUFFIXES and path.is_file():
        windows = _read_tokens(path)
        if windows.dim() == 2 and windows.shape[1] == seqlen and windows.shape[0] >= nsamples:
            return windows[:nsamples].clone()
    ids = read_token_ids(path, tokenizer, min_tokens=seqlen)
    if ids.numel() < seqlen:
        raise CalibrationError(f"{path}: only {ids.numel()} tokens, fewer than seqlen={seqlen}; give more text "
                               f"or a smaller --seqlen")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator)
    if ids.numel() < nsamples * seqlen:
        logger.warning("%s: %d tokens for %d x %d calibration tokens; windows will overlap", path, ids.numel(),
                       nsamples, seqlen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
