"""Quantizer memory: the streamed checkpoint writer and the allocator release between layers."""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptq_tools.quant.memory import anonymous_bytes, release_free_memory
from gptq_tools.quant.save import TensorRef, _save_safetensors, write_tensors

TENSORS = {
    "b.qweight": torch.arange(24, dtype=torch.int32).reshape(4, 6),
    "a.scales": torch.linspace(0, 1, 6).to(torch.float16),
    "c.g_idx": torch.arange(5, dtype=torch.int32),
    "a.bias": torch.ones(3, dtype=torch.bfloat16),
    "scalar": torch.tensor(2.5),
    "mask": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 4, dtype=torch.float16),
}


def test_streamed_file_is_byte_identical_to_save_file(tmp_path: Path) -> None:
    save_file(TENSORS, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    with_meta = [TensorRef(n, t.numel() * t.element_size(), lambda n=n: TENSORS[n],
                           dtype={torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16",
                                  torch.float32: "F32", torch.bool: "BOOL"}[t.dtype], shape=tuple(t.shape))
                 for n, t in TENSORS.items()]
    without_meta = [TensorRef(n, 0, lambda n=n: TENSORS[n]) for n in TENSORS]
    _save_safetensors(with_meta, tmp_path / "streamed.safetensors")
    _save_safetensors(without_meta, tmp_path / "probed.safetensors")
    reference = (tmp_path / "reference.safetensors").read_bytes()
    assert (tmp_path / "streamed.safetensors").read_bytes() == reference
    assert (tmp_path / "probed.safetensors").read_bytes() == reference


def test_writer_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    alive: list[weakref.ref] = []
    peak = 0

    def loader(index: int) -> torch.Tensor:
        nonlocal peak
        peak = max(peak, sum(ref() is not None for ref in alive))
        tensor = torch.full((256, 256), float(index), dtype=torch.float16)
        alive.append(weakref.ref(tensor))
        return tensor

    refs = [TensorRef(f"t{i:02d}", 256 * 256 * 2, lambda i=i: loader(i), dtype="F16", shape=(256, 256))
            for i in range(12)]
    files = write_tensors(refs, tmp_path, max_shard_size=1 << 30, single_file="one.safetensors")
    assert files == ["one.safetensors"]
    assert peak <= 1  # the previous tensor is gone before the next one is loaded
    from safetensors.torch import load_file

    loaded = load_file(str(tmp_path / "one.safetensors"))
    assert [float(loaded[f"t{i:02d}"][0, 0]) for i in range(12)] == [float(i) for i in range(12)]


def test_read_back_mismatch_is_named(tmp_path: Path) -> None:
    import pytest

    from gptq_tools.errors import QuantizationError

    refs = [TensorRef("x.scales", 8, lambda: torch.zeros(4, dtype=torch.float32), dtype="F16", shape=(4,))]
    with pytest.raises(QuantizationError, match=r"x.scales: the tensor read back is torch.float32 \(4,\), not F16"):
        _save_safetensors(refs, tmp_path / "bad.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written at the final name, no temporary left


def test_release_and_measure() -> None:
    before = anonymous_bytes()
    assert before is not None and before > 0
    blocks = [torch.ones(1 << 18) for _ in range(64)]  # 64 MiB in 1 MiB blocks
    del blocks
    assert release_free_memory() is True  # glibc: malloc_trim is there
    assert anonymous_bytes() < before + 32 * 1024 * 1024
    assert anonymous_bytes(999_999_999) is None
