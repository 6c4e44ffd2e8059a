"""generate: greedy output equals the float reference model's; the CLI prints prompt + continuation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptq_tools.cli import main
from gptq_tools.errors import CheckpointError, UsageError
from gptq_tools.runtime.generate import Sampling, generate, generate_text, load_tokenizer
from gptq_tools.runtime.load import load_quantized

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
    assert result.token_ids == tuple(expected[0, 3:].tolist())
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
    assert "new token ids" not in captured.err  # only with -v


def test_cli_generate_verbose_logs_the_new_token_ids(checkpoint: TinyCheckpoint,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v", "generate", str(checkpoint.folder), "--prompt", "w1 w5 w9", "--max-new-tokens", "4",
                 "--dtype", "float32"]) == 0
    expected = generate(checkpoint.folder, "w1 w5 w9", max_new_tokens=4, dtype=torch.float32)
    assert f"INFO: new token ids: {' '.join(map(str, expected.token_ids))}\n" in capsys.readouterr().err


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


# ------------------------------------------------------------------- sampling, streaming, interactive
@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A preset ``tiny`` for repository ``test/tiny-bloom``, whose download folder ``tiny-bloom`` holds a
    checkpoint with a tokenizer; returns the folder above both (cwd for the tests, GPTQ_TOOLS_CONFIGS)."""
    root = tmp_path_factory.mktemp("tiny-preset")
    built = build_tiny_checkpoint(root / "tiny-bloom", "bloom", desc_act=True)
    save_tokenizer(built.folder)
    (root / "presets").mkdir()
    (root / "presets" / "tiny.json").write_text('{"name": "tiny", "repo_id": "test/tiny-bloom"}')
    return root


@pytest.fixture(scope="module")
def loaded(tiny_preset: Path) -> tuple[torch.nn.Module, object]:
    folder = tiny_preset / "tiny-bloom"
    return load_quantized(folder, dtype=torch.float32), load_tokenizer(folder)


def test_streamed_pieces_arrive_one_by_one_and_join_to_the_text(loaded: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = loaded
    pieces: list[str] = []
    result = generate_text(model, tokenizer, "w1 w5 w9", max_new_tokens=6, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == result.text


def test_sampling_knobs_reach_generate(loaded: tuple[torch.nn.Module, object]) -> None:
    model, tokenizer = loaded
    greedy = generate_text(model, tokenizer, "w1 w5 w9", max_new_tokens=8).text
    only_best = Sampling(do_sample=True, temperature=3.0, top_k=1, seed=1)  # top-1 sampling is greedy
    assert generate_text(model, tokenizer, "w1 w5 w9", max_new_tokens=8, sampling=only_best).text == greedy
    hot = Sampling(do_sample=True, temperature=50.0, top_p=1.0, seed=3)
    first = generate_text(model, tokenizer, "w1 w5 w9", max_new_tokens=8, sampling=hot).text
    assert first == generate_text(model, tokenizer, "w1 w5 w9", max_new_tokens=8, sampling=hot).text  # seeded
    assert first != greedy
    assert Sampling(temperature=0.0, do_sample=True).generate_options()["do_sample"] is False
    assert Sampling(repetition_penalty=1.3).generate_options() == {
        "repetition_penalty": 1.3, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}


@pytest.mark.parametrize(("option", "message"), [
    (["--temperature", "-1"], "--temperature -1.0 must be 0 (greedy) or more"),
    (["--temperature", "nan"], "--temperature nan must be 0 (greedy) or more"),
    (["--top-p", "0"], "--top-p 0.0 must be in (0, 1]; 1 switches it off"),
    (["--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
    (["--top-k", "-2"], "--top-k -2 must be 0 (off) or more"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0.0 must be positive; 1 switches it off"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--prompt", ""], "the prompt is empty"),
])
def test_cli_sampling_refusals(option: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "/nonexistent", *option]
    assert main(argv if "--prompt" in option else [*argv, "--prompt", "w1"]) == 2  # refused before any loading
    assert capsys.readouterr().err.startswith(f"gptq-tools: error: {message}")


def test_cli_needs_prompt_or_interactive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["generate", "/nonexistent", "--prompt", "w1", "--interactive"])
    assert excinfo.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_cli_interactive_by_preset_name(tiny_preset: Path, loaded: tuple[torch.nn.Module, object],
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``generate tiny --interactive`` finds the preset's download folder, answers every stdin line in turn."""
    import io

    model, tokenizer = loaded
    expected = [generate_text(model, tokenizer, p, max_new_tokens=5).text for p in ("w1 w5 w9", "w2 w3")]
    monkeypatch.chdir(tiny_preset)
    monkeypatch.setenv("GPTQ_TOOLS_CONFIGS", str(tiny_preset))
    monkeypatch.setattr("sys.stdin", io.StringIO("w1 w5 w9\n\n   \nw2 w3\r\n"))
    assert main(["generate", "tiny", "--interactive", "--max-new-tokens", "5", "--dtype", "float32",
                 "--max-memory", "cpu=1GiB"]) == 0
    captured = capsys.readouterr()  # each answer after its prompt, then a line that ends it
    assert captured.out == "".join(f"> {prompt}\n{text}\n--- end of answer ---\n"
                                   for prompt, text in zip(("w1 w5 w9", "w2 w3"), expected))
    assert captured.err.count("5 tokens in") == 2 and "> " not in captured.err  # no cue when stdin is a pipe
    monkeypatch.setattr("sys.stdin", io.StringIO("w1 w5 w9\n\nw2 w3\n"))
    assert main(["generate", "tiny", "--interactive", "--json", "--max-new-tokens", "5", "--dtype", "float32",
                 "--max-memory", "cpu=1GiB"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(a["prompt"], a["text"], a["new_tokens"]) for a in answers] == [("w1 w5 w9", expected[0], 5),
                                                                            ("w2 w3", expected[1], 5)]


def test_cli_generate_takes_gpus(tiny_preset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(tiny_preset / "tiny-bloom")
    assert main(["generate", folder, "--prompt", "w1", "--gpus", "2x80GB", "--max-memory", "0=1GiB"]) == 2
    assert "give exactly one of --max-memory (0=60GiB,1=79GiB) or --gpus (2x80GB)" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", folder, "--prompt", "w1", "--gpus", "2x80GB"]) == 2
        assert "device 0 does not exist: this machine has 0 CUDA device(s)" in capsys.readouterr().err
