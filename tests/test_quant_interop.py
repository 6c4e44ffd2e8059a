"""GPTQModel (in its own venv) loads our checkpoint and computes what our checkpoint says.

Skipped unless a Python with GPTQModel exists (``GPTQMODEL_PYTHON``, default .venv-gptqmodel from
``make venv-gptqmodel``).
Asymmetric checkpoints are checked in the ``gptq_v2`` format: GPTQModel refuses every asymmetric v1
checkpoint not written by GPTQModel itself (AutoGPTQ's were corrupt), whatever its contents.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from gptq_tools.checkpoint.tiny import TinySpec, build_tiny_model
from gptq_tools.quant.config import QuantizeConfig
from gptq_tools.quant.driver import quantize_model
from gptq_tools.quant.evaluate import load_for_eval

GPTQMODEL_PYTHON = Path(os.environ.get("GPTQMODEL_PYTHON",
                                       Path(__file__).resolve().parents[1] / ".venv-gptqmodel" / "bin" / "python"))

SCRIPT = """
import os, sys
import torch
from gptqmodel import BACKEND, GPTQModel
model = GPTQModel.load(sys.argv[1], backend=BACKEND.TORCH, device="cpu")
with torch.no_grad():
    logits = model.model(input_ids=torch.tensor([list(range(3, 67))])).logits[0].float()
torch.save(logits, sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.skipif(not GPTQMODEL_PYTHON.exists(), reason="no GPTQModel venv (set GPTQMODEL_PYTHON)")
@pytest.mark.parametrize("config", [QuantizeConfig(group_size=16, desc_act=True, static_groups=False),
                                    QuantizeConfig(group_size=32, desc_act=True, static_groups=True, sym=False,
                                                   checkpoint_format="gptq_v2")],
                         ids=["sym-v1-act-order", "asym-v2-static-groups"])
def test_gptqmodel_reads_our_checkpoint(tmp_path: Path, config: QuantizeConfig) -> None:
    spec = TinySpec(hidden=64, layers=2, heads=2, vocab_size=512, seqlen=64, batch=8, steps=20)
    model = build_tiny_model("opt", tmp_path / "model", spec=spec)
    out = tmp_path / "out"
    quantize_model(model, out, calibration=model / "train.txt", nsamples=8, seqlen=64,
                   config=config)
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": ""}
    done = subprocess.run([str(GPTQMODEL_PYTHON), "-c", SCRIPT, str(out), str(tmp_path / "logits.pt")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        ours = load_for_eval(out)(input_ids=torch.tensor([list(range(3, 67))])).logits[0]
    # GPTQModel's torch kernel runs in fp16: agreement to fp16 precision of the logits
    assert (ours - theirs).abs().max() < 0.02 * ours.abs().max() + 0.01
