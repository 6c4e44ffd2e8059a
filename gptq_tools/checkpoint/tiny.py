"""Tiny OPT/BLOOM/LLaMA models the project builds itself, trained on text every machine with Python has.

The corpus is the docstrings of a fixed list of CPython standard-library modules (read with ``ast``,
never imported), so it needs no download; train and eval text come from disjoint modules. A small
byte-level BPE tokenizer is trained on the train text with ``tokenizers`` and saved as a transformers
tokenizer next to the model. Everything is seeded: the same Python and torch give the same files.

Used by ``make demo``, the quantization benchmark and the tests.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OutputExistsError, UsageError

logger = logging.getLogger(__name__)

TRAIN_MODULES = (
    "argparse", "collections", "functools", "itertools", "pathlib", "typing", "dataclasses", "inspect",
    "logging", "subprocess", "threading", "asyncio.base_events", "json.decoder", "json.encoder", "re",
    "email.message", "http.client", "urllib.parse", "unittest.case", "tarfile", "zipfile", "shutil",
    "tempfile", "textwrap", "datetime", "decimal", "fractions", "statistics", "random", "heapq",
    "bisect", "contextlib", "enum", "abc", "ast", "codecs", "csv", "configparser", "difflib", "doctest",
    "ftplib", "gettext", "gzip", "imaplib", "locale", "mailbox", "optparse", "os", "pickle", "pdb",
)
EVAL_MODULES = ("pydoc", "smtplib", "string", "calendar", "traceback", "warnings", "weakref", "queue")

TINY_ARCHS = ("opt", "bloom", "llama")


@dataclass(frozen=True)
class TinySpec:
    """Size and training of a tiny model."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    vocab_size: int = 2048
    seqlen: int = 128
    batch: int = 16
    steps: int = 200
    lr: float = 3e-3


def _module_docstrings(module: str) -> list[str]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                texts.append(doc.strip())
    return texts


def tiny_corpus() -> tuple[str, str]:
    """(train text, eval text): standard-library docstrings from disjoint module lists, deterministic."""
    train = "\n\n".join(doc for module in TRAIN_MODULES for doc in _module_docstrings(module))
    evaluation = "\n\n".join(doc for module in EVAL_MODULES for doc in _module_docstrings(module))
    return train, evaluation


def train_tokenizer(text: str, out_dir: Path, *, vocab_size: int) -> object:
    """Train a byte-level BPE on ``text``, save it as a transformers tokenizer in ``out_dir``, return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text[i:i + 4096] for i in range(0, len(text), 4096)], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", bos_token="</s>",
                                      unk_token="</s>", pad_token="</s>")
    wrapped.save_pretrained(out_dir)
    return wrapped


def _model_config(arch: str, spec: TinySpec, vocab_size: int) -> object:
    from transformers import BloomConfig, LlamaConfig, OPTConfig

    if arch == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                         num_attention_heads=spec.heads, ffn_dim=4 * spec.hidden, max_position_embeddings=512,
                         word_embed_proj_dim=spec.hidden, do_layer_norm_before=True, dropout=0.0,
                         attention_dropout=0.0, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if arch == "bloom":
        return BloomConfig(vocab_size=vocab_size, hidden_size=spec.hidden, n_layer=spec.layers, n_head=spec.heads,
                           hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0, bos_token_id=0,
                           eos_token_id=0)
    if arch == "llama":  # grouped-query attention (2 KV heads) and a gated MLP, as in current LLaMA releases
        return LlamaConfig(vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=4 * spec.hidden,
                           num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                           num_key_value_heads=max(1, spec.heads // 2), max_position_embeddings=512,
                           tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    raise UsageError(f"tiny models exist for {', '.join(map(repr, TINY_ARCHS))}, not {arch!r}")


def _train(model: torch.nn.Module, ids: torch.Tensor, spec: TinySpec, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / spec.steps)))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(spec.steps):
        starts = torch.randint(0, ids.numel() - spec.seqlen - 1, (spec.batch,), generator=generator)
        batch = torch.stack([ids[s:s + spec.seqlen] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return float(loss.detach())


def build_tiny_model(arch: str = "opt", out_dir: str | Path = "tiny-model", *, seed: int = 0,
                     spec: TinySpec | None = None, force: bool = False) -> Path:
    """Build, train and save a tiny causal LM with its tokenizer and corpus.

    The folder gets ``config.json``, ``model.safetensors`` (fp16), tokenizer files, ``train.txt`` and
    ``eval.txt`` (the calibration and evaluation text).

    Args:
        arch: ``"opt"``, ``"bloom"`` or ``"llama"``.
        out_dir: folder to create.
        seed: seeds initialisation and batch order.
        spec: sizes and training length (default :class:`TinySpec`: 4 layers, hidden 128, 200 steps).
        force: replace an existing folder.

    Returns:
        The folder.

    Raises:
        OutputExistsError: ``out_dir`` exists and is not empty, without ``force``.
        UsageError: unknown ``arch``.
    """
    from transformers import AutoModelForCausalLM

    if arch not in TINY_ARCHS:
        raise UsageError(f"tiny models exist for {', '.join(map(repr, TINY_ARCHS))}, not {arch!r}")
    spec = spec or TinySpec()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise OutputExistsError(f"{out_dir}: folder is not empty; pass force=True to rebuild the tiny model")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_text, eval_text = tiny_corpus()
    tokenizer = train_tokenizer(train_text, out_dir, vocab_size=spec.vocab_size)
    ids = torch.tensor(tokenizer(train_text)["input_ids"], dtype=torch.long)
    torch.manual_seed(seed)
    config = _model_config(arch, spec, len(tokenizer))
    model = AutoModelForCausalLM.from_config(config)
    with torch.inference_mode(False):
        loss = _train(model, ids, spec, seed)
    logger.info("tiny %s: %d parameters, final train loss %.3f", arch, sum(p.numel() for p in model.parameters()), loss)
    model.to(torch.float16).save_pretrained(out_dir)
    (out_dir / "train.txt").write_text(train_text, encoding="utf-8")
    (out_dir / "eval.txt").write_text(eval_text, encoding="utf-8")
    (out_dir / "tiny_spec.json").write_text(json.dumps({"arch": arch, "seed": seed, **spec.__dict__}, indent=2))
    return out_dir
