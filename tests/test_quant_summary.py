"""The quantize summary: no line a log scanner reads as an error, and its seconds add up to the real time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gptq_tools.cli.quantize import format_summary
from gptq_tools.quant.config import QuantizeConfig
from gptq_tools.quant.driver import LinearReport, QuantizeSummary, quantize_model


def test_summary_table_lines() -> None:
    linears = tuple(LinearReport(layer, f"model.layers.{layer}.{name}", "gptq", 0.5, 1.0, 0.01, 0.25)
                    for layer in (0, 1) for name in ("q", "k"))
    summary = QuantizeSummary(Path("out"), QuantizeConfig(), linears, ("model.safetensors",), 10.0, 1,
                              layer_seconds={1: 4.0}, setup_seconds=5.0, write_seconds=1.0)
    lines = format_summary(summary).splitlines()
    assert not any(line.lower().lstrip().startswith(("error", "err:", "err ")) for line in lines)
    assert lines[1].split() == ["layer", "linears", "err", "rtn_err", "gain", "damp", "solve_s", "layer_s"]
    assert lines[2].split()[-2:] == ["0.50", "-"]  # layer 0 was done by the interrupted run
    assert lines[3].split()[-2:] == ["0.50", "4.00"]
    assert "(resumed at layer 1; '-': done by the earlier run)" in lines[4]
    assert lines[5] == "time: setup 5.0 s + 1 layers 4.0 s + writing 1.0 s = 10.0 s"


def test_seconds_add_up_to_the_wall_time(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, OPTConfig

    model = tmp_path / "model"
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=256, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(model)
    calibration = tmp_path / "calib.safetensors"
    save_file({"input_ids": torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))},
              str(calibration))
    started = time.perf_counter()
    summary = quantize_model(model, tmp_path / "out", calibration=calibration,
                             config=QuantizeConfig(group_size=32), nsamples=4, seqlen=32)
    wall = time.perf_counter() - started
    assert sorted(summary.layer_seconds) == [0, 1]
    parts = summary.setup_seconds + sum(summary.layer_seconds.values()) + summary.write_seconds
    assert parts == pytest.approx(summary.seconds, abs=1e-6) and 0 < wall - summary.seconds < 0.5
    assert min(summary.setup_seconds, summary.write_seconds) > 0
    for layer, seconds in summary.layer_seconds.items():  # the layer's wall time holds its GPTQ solves
        assert seconds > sum(r.seconds for r in summary.linears if r.layer == layer)
    lines = format_summary(summary).splitlines()  # what `gptq-tools quantize` prints
    assert lines[0].startswith("quantization summary; err: mean squared output error")
    assert lines[-2].startswith("time: setup ") and lines[-2].endswith(f"= {summary.seconds:.1f} s")
