"""generate: greedy output equals the float reference model's; the CLI prints prompt + continuation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptq_tools.cli import main
from gptq_tools.errors import CheckpointError, UsageError
from gptq_tools.generate import generate, generate_text, load_tokenizer
from gptq_tools.load import load_quantized

from .tiny_gptq import TinyCheckpoint, build_tiny_checkpoint, reference_model


def save_tokenizer(folder: Path, vocab: int = 96) -> None:
    """A whitespace word-level tokenizer: token ``wN`` is id ``N + 3``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                            bos_token="</s>").save_pretrained(folder)


@pytest.fixture
def checkpoint(tmp_path: Path) -> TinyCheckpoint:
    built = build_tiny_checkpoint(tmp_path / "ckpt", "bloom", desc_act=True)
    save_tokenizer(built.folder)
    return built


def test_greedy_generation_matches_reference(checkpoint: TinyCheckpoint) -> None:
    result = generate(checkpoint.folder, "w1 w5 w9", max_new_tokens=6, dtype=torch.float32)
    prompt_ids = torch.tensor([[4, 8, 12]])
    expected = reference_model(checkpoint).generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                                    max_new_tokens=6, do_sample=False)
    tokenizer = load_tokenizer(checkpoint.folder)
    assert result.new_tokens == expected.shape[1] - 3
    assert result.text == tokenizer.decode(expected[0, 3:], skip_special_tokens=True)
    assert result.tokens_per_second > 0


def test_generate_with_offloaded_layer(checkpoint: TinyCheckpoint, tmp_path: Path) -> None:
    model = load_quantized(checkpoint.folder, dtype=torch.float32, offload_folder=tmp_path / "off",
                           device_map={"transformer.word_embeddings": "cpu",
                                       "transformer.word_embeddings_layernorm": "cpu", "transformer.h.0": "disk",
                                       "transformer.h.1": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"})
    tokenizer = load_tokenizer(checkpoint.folder)
    offloaded = generate_text(model, tokenizer, "w1 w5 w9", max_new_tokens=6)
    assert offloaded.text == generate(checkpoint.folder, "w1 w5 w9", max_new_tokens=6, dtype=torch.float32).text


def test_cli_generate_prints_prompt_and_continuation(checkpoint: TinyCheckpoint,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(checkpoint.folder), "--prompt", "w1 w5 w9", "--max-new-tokens", "4",
                 "--max-memory", "cpu=2GiB", "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    expected = generate(checkpoint.folder, "w1 w5 w9", max_new_tokens=4, dtype=torch.float32)
    assert captured.out.strip() == "w1 w5 w9" + expected.text
    assert "4 tokens in" in captured.err


def test_cli_generate_refuses_too_small_caps(checkpoint: TinyCheckpoint, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(checkpoint.folder), "--prompt", "w1", "--max-memory", "cpu=1KiB"]) == 1
    assert "does not fit" in capsys.readouterr().err


def test_bad_generation_arguments(checkpoint: TinyCheckpoint, capsys: pytest.CaptureFixture[str]) -> None:
    model = load_quantized(checkpoint.folder)
    tokenizer = load_tokenizer(checkpoint.folder)
    with pytest.raises(UsageError, match="the prompt is empty"):
        generate_text(model, tokenizer, "")
    with pytest.raises(UsageError, match="max_new_tokens must be at least 1, got 0"):
        generate_text(model, tokenizer, "w1", max_new_tokens=0)
    assert main(["generate", str(checkpoint.folder), "--prompt", "w1", "--dtype", "int4"]) == 2
    assert "--dtype 'int4' is not supported; use float16, bfloat16 or float32" in capsys.readouterr().err


def test_missing_tokenizer(tmp_path: Path) -> None:
    built = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    with pytest.raises(CheckpointError, match=r"no tokenizer files .*copy the original model's tokenizer"):
        generate(built.folder, "w1")
