"""The tiny-model builder: offline corpus, deterministic output, a loadable model with its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptq_tools.checkpoint.tiny import EVAL_MODULES, TRAIN_MODULES, TinySpec, build_tiny_model, tiny_corpus
from gptq_tools.errors import OutputExistsError, UsageError

SPEC = TinySpec(hidden=32, layers=1, heads=2, vocab_size=300, seqlen=32, batch=2, steps=3)


def test_corpus_is_offline_deterministic_and_split() -> None:
    train, evaluation = tiny_corpus()
    assert (train, evaluation) == tiny_corpus()
    assert len(train) > 100_000 and len(evaluation) > 10_000
    assert not set(TRAIN_MODULES) & set(EVAL_MODULES)
    assert evaluation[:2000] not in train


def test_build_is_deterministic_and_loadable(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = build_tiny_model("bloom", tmp_path / "a", spec=SPEC, seed=1)
    second = build_tiny_model("bloom", tmp_path / "b", spec=SPEC, seed=1)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert json.loads((first / "config.json").read_text())["model_type"] == "bloom"
    tokenizer = AutoTokenizer.from_pretrained(first)
    model = AutoModelForCausalLM.from_pretrained(first)
    ids = tokenizer("Return the sum of the values.", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)
    assert (first / "train.txt").read_text() == tiny_corpus()[0]


def test_refuses_to_overwrite_and_unknown_arch(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="busy: folder is not empty; pass force=True"):
        build_tiny_model("opt", tmp_path / "busy", spec=SPEC)
    with pytest.raises(UsageError, match="tiny models exist for 'opt', 'bloom', 'llama', not 'gpt2'"):
        build_tiny_model("gpt2", tmp_path / "new", spec=SPEC)
