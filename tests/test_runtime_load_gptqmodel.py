"""Interop with GPTQModel on CPU, both ways (skipped where gptqmodel is not importable).

The full matrix (OPT/BLOOM, act-order off/on) is ``scripts/interop_gptqmodel.py``, run with the Python
of a GPTQModel environment.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("gptqmodel")
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "interop_gptqmodel.py"


def load_script():  # returns the script as a module
    spec = importlib.util.spec_from_file_location("interop_gptqmodel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model_type", ["opt", "bloom"])
def test_round_trip_with_gptqmodel(tmp_path: Path, model_type: str) -> None:
    from .tiny_gptq import build_tiny_checkpoint

    interop = load_script()
    ids = torch.randint(3, interop.VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    theirs_dir = interop.gptqmodel_quantize(interop.float_model(tmp_path / "float", model_type),
                                            tmp_path / "gptqmodel", desc_act=True)
    theirs, dtype = interop.gptqmodel_logits(theirs_dir, ids)
    row = interop.compare("theirs", theirs, interop.ours_logits(theirs_dir, ids, dtype), dtype)
    assert row["ok"], row
    ours_dir = build_tiny_checkpoint(tmp_path / "ours", model_type, desc_act=True).folder
    interop.save_tokenizer(ours_dir)
    theirs, dtype = interop.gptqmodel_logits(ours_dir, ids)
    row = interop.compare("ours", theirs, interop.ours_logits(ours_dir, ids, dtype), dtype)
    assert row["ok"], row
