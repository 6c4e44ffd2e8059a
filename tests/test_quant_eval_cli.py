"""``gptq-tools eval``: perplexity on a file, KL divergence from the fp16 model, --json, the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gptq_tools.checkpoint.tiny import TinySpec, build_tiny_model
from gptq_tools.cli import main
from gptq_tools.quant.config import QuantizeConfig
from gptq_tools.quant.driver import quantize_model
from gptq_tools.quant.evaluate import folder_perplexity
from gptq_tools.quant.quality import evaluate_model

SPEC = TinySpec(hidden=64, layers=2, heads=2, vocab_size=512, seqlen=64, batch=8, steps=40)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    fp16 = build_tiny_model("opt", root / "opt", spec=SPEC)
    quantized = root / "opt-gptq"
    quantize_model(fp16, quantized, calibration=fp16 / "train.txt", config=QuantizeConfig(group_size=32),
                   nsamples=8, seqlen=64)
    return fp16, quantized


def test_perplexity_matches_the_library(models: tuple[Path, Path], tmp_path: Path) -> None:
    fp16, _ = models
    text = (fp16 / "eval.txt").read_text()[:6000]
    (tmp_path / "eval.txt").write_text(text)
    report = evaluate_model(fp16, tmp_path / "eval.txt", seqlen=64)
    assert report.perplexity == pytest.approx(folder_perplexity(fp16, text, seqlen=64), rel=1e-6)
    assert report.kl_divergence is None and report.windows == report.tokens // 64


def test_kl_to_itself_is_zero_and_positive_for_the_quantized(models: tuple[Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    fp16, quantized = models
    (tmp_path / "eval.txt").write_text((fp16 / "eval.txt").read_text()[:6000])
    same = evaluate_model(fp16, tmp_path / "eval.txt", against=fp16, seqlen=64)
    assert abs(same.kl_divergence) < 1e-6 and same.reference_perplexity == pytest.approx(same.perplexity)
    assert main(["eval", str(quantized), "--text", str(tmp_path / "eval.txt"), "--against", str(fp16), "--seqlen",
                 "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kl_divergence"] > 0 and math.isfinite(data["perplexity"])
    assert data["reference_perplexity"] == pytest.approx(same.perplexity)
    assert abs(math.log(data["perplexity"] / data["reference_perplexity"])) < 0.5  # 4-bit moves it little
    assert main(["eval", str(quantized), "--text", str(tmp_path / "eval.txt"), "--against", str(fp16), "--seqlen",
                 "64", "--max-tokens", "640"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{quantized}: perplexity ") and "(640 tokens, 10 windows of 64, " in lines[0]
    assert lines[1].startswith(f"{fp16} (reference): perplexity ")
    assert lines[2].startswith("KL divergence from the reference: ") and "nats/token" in lines[2]


def test_calibration_file_and_token_ids(models: tuple[Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    fp16, _ = models
    from transformers import AutoTokenizer

    text = (fp16 / "train.txt").read_text()[:5000]
    (tmp_path / "calib.txt").write_text(text)
    ids = torch.tensor(AutoTokenizer.from_pretrained(fp16)(text)["input_ids"])
    torch.save({"input_ids": ids}, tmp_path / "calib.pt")
    assert main(["eval", str(fp16), "--calibration", str(tmp_path / "calib.txt"), "--seqlen", "64", "--json"]) == 0
    from_text = json.loads(capsys.readouterr().out)["perplexity"]
    assert main(["eval", str(fp16), "--calibration", str(tmp_path / "calib.pt"), "--seqlen", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(from_text)


@pytest.mark.parametrize(("argv", "message"), [
    (["--text", "missing.txt"], "missing.txt: calibration file not found"),
    (["--text", "short.txt", "--seqlen", "512"], "fewer than one window of --seqlen 512"),
    (["--text", "short.txt", "--seqlen", "1"], "--seqlen must be at least 2, got 1"),
    (["--text", "short.txt", "--against", "nowhere"], "nowhere: no such folder; give the fp16 model folder"),
])
def test_refusals(models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    fp16, _ = models
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short.txt").write_text("a few words only")
    assert main(["eval", str(fp16), *argv]) != 0
    assert message in capsys.readouterr().err


def test_text_and_calibration_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "m", "--text", "a.txt", "--calibration", "b.txt"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_save_keeps_the_result_in_the_model_folder(models: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from gptq_tools.checkpoint.eval_results import read_eval_results

    fp16, _ = models
    folder = tmp_path / "model"
    shutil.copytree(fp16, folder)
    (tmp_path / "eval.txt").write_text((fp16 / "eval.txt").read_text()[:6000])
    argv = ["eval", str(folder), "--text", str(tmp_path / "eval.txt"), "--seqlen", "64", "--max-tokens", "640"]
    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert not (folder / "eval.json").exists()  # only with --save
    assert main([*argv, "--save"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"saved to {folder / 'eval.json'}"
    saved = read_eval_results(folder)
    assert len(saved) == 1 and saved[0]["perplexity"] == pytest.approx(printed["perplexity"])
    assert main([*argv, "--save"]) == 0  # the same measurement again replaces it
    assert len(read_eval_results(folder)) == 1
