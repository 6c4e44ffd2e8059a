"""On a CUDA machine: a model split between cuda:0 and the CPU under a real cap (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptq_tools.runtime.load import load_quantized
from gptq_tools.runtime.plan import PlanOptions, load_layout, place_layout

from .tiny_gptq import build_tiny_checkpoint, reference_model


def half_model_cap(folder: Path) -> int:
    """A GPU 0 cap that holds the headroom and about half the weights (the rest goes to the CPU)."""
    options = PlanOptions(dtype=torch.float32, cuda_context_bytes=0, seq_len=16)
    layout, _ = load_layout(folder, options=options)
    whole = place_layout(layout, {0: 2**40}, options)
    return whole.devices["0"].reserved_bytes + layout.total_weight_bytes // 2


def test_half_model_cap_splits_the_plan(tmp_path: Path) -> None:  # runs without a GPU: the planner only
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", desc_act=True, layers=4)
    options = PlanOptions(dtype=torch.float32, cuda_context_bytes=0, seq_len=16)
    layout, _ = load_layout(checkpoint.folder, options=options)
    placement = place_layout(layout, {0: half_model_cap(checkpoint.folder), "cpu": 2**30}, options)
    assert placement.fits and placement.devices["0"].modules and placement.devices["cpu"].modules


@pytest.mark.gpu
def test_split_between_cuda0_and_cpu_respects_the_cap(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", desc_act=True, layers=4)
    cap = half_model_cap(checkpoint.folder)
    model = load_quantized(checkpoint.folder, dtype=torch.float32, max_memory={0: cap, "cpu": "1GiB"},
                           cuda_context=0, seq_len=16)
    placement = model.gptq_placement
    gpu = placement.devices["0"]
    assert placement.devices["cpu"].modules and gpu.modules
    assert gpu.weight_bytes + gpu.reserved_bytes <= cap
    on_gpu = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict(keep_vars=True).values()
                                                        if t.device.type == "cuda"}.values())
    assert on_gpu == gpu.weight_bytes
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids.to("cuda:0")).logits.float().cpu()
        expected = reference_model(checkpoint)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_whole_model_on_cuda0_matches_cpu(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "bloom", desc_act=True, checkpoint_format="gptq_v2")
    model = load_quantized(checkpoint.folder, dtype=torch.float16, device_map="cuda:0")
    assert all(t.device.type == "cuda" for t in model.state_dict().values())
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids.to("cuda:0")).logits.float().cpu()
        expected = reference_model(checkpoint)(ids).logits
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)

