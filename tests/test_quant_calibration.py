"""Calibration loading: every format, determinism, and each bad-input message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gptq_tools.errors import CalibrationError
from gptq_tools.quant.calibration import load_calibration


class _WordTokenizer:
    """One token per whitespace-separated word (ids by first appearance): enough to test the sampler."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        vocab: dict[str, int] = {}
        return {"input_ids": [vocab.setdefault(word, len(vocab)) for word in text.split()]}


TEXT = " ".join(f"w{i % 97}" for i in range(1000))


def test_text_windows_are_deterministic_and_in_range(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    first = load_calibration(path, _WordTokenizer(), nsamples=5, seqlen=50, seed=3)
    again = load_calibration(path, _WordTokenizer(), nsamples=5, seqlen=50, seed=3)
    other = load_calibration(path, _WordTokenizer(), nsamples=5, seqlen=50, seed=4)
    assert first.shape == (5, 50) and first.dtype == torch.int64
    assert torch.equal(first, again) and not torch.equal(first, other)
    # windows are contiguous runs of the stream: consecutive ids follow the w{i % 97} cycle
    assert torch.all((first[:, 1:] - first[:, :-1]) % 97 == 1)


def test_jsonl_and_tokenized_files(tmp_path: Path) -> None:
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": TEXT[i:i + 500]}) for i in range(0, len(TEXT), 500)) + "\n\n")
    assert load_calibration(jsonl, _WordTokenizer(), nsamples=2, seqlen=20).shape == (2, 20)
    rows = torch.arange(4 * 16).reshape(4, 16)
    tokenized = tmp_path / "c.safetensors"
    save_file({"input_ids": rows}, str(tokenized))
    assert torch.equal(load_calibration(tokenized, None, nsamples=3, seqlen=16), rows[:3])
    stream = tmp_path / "c.pt"
    torch.save({"input_ids": torch.arange(100)}, stream)
    windows = load_calibration(stream, None, nsamples=4, seqlen=10)
    assert torch.all(windows[:, 1:] - windows[:, :-1] == 1)


def test_bad_calibration_files(tmp_path: Path) -> None:
    tokenizer = _WordTokenizer()
    with pytest.raises(CalibrationError, match="missing.txt: calibration file not found"):
        load_calibration(tmp_path / "missing.txt", tokenizer, nsamples=1, seqlen=4)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(CalibrationError, match="empty.txt: calibration file is empty"):
        load_calibration(empty, tokenizer, nsamples=1, seqlen=4)
    short = tmp_path / "short.txt"
    short.write_text("a b c")
    with pytest.raises(CalibrationError, match="short.txt: only 3 tokens, fewer than seqlen=4"):
        load_calibration(short, tokenizer, nsamples=1, seqlen=4)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(CalibrationError, match="bin.txt: not UTF-8 text"):
        load_calibration(binary, tokenizer, nsamples=1, seqlen=4)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a b"}\n{oops\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:2: not valid JSON"):
        load_calibration(bad_json, tokenizer, nsamples=1, seqlen=1)
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text('{"content": "a b"}\n')
    with pytest.raises(CalibrationError, match="notext.jsonl:1: no string \"text\" field"):
        load_calibration(no_text, tokenizer, nsamples=1, seqlen=1)
    floats = tmp_path / "floats.safetensors"
    save_file({"input_ids": torch.zeros(2, 3)}, str(floats))
    with pytest.raises(CalibrationError, match="floats.safetensors: expected an integer tensor 'input_ids'"):
        load_calibration(floats, None, nsamples=1, seqlen=3)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x01\x00")
    with pytest.raises(CalibrationError, match="broken.safetensors: cannot read as safetensors"):
        load_calibration(broken, None, nsamples=1, seqlen=3)
    pickle = tmp_path / "evil.pt"
    pickle.write_bytes(b"not a torch file")
    with pytest.raises(CalibrationError, match="evil.pt: cannot read as a tensor file"):
        load_calibration(pickle, None, nsamples=1, seqlen=3)
    unknown = tmp_path / "c.csv"
    unknown.write_text("a,b")
    with pytest.raises(CalibrationError, match="unknown calibration format '.csv'"):
        load_calibration(unknown, tokenizer, nsamples=1, seqlen=1)
