"""Quantizer memory: the streamed checkpoint writer and the allocator release between layers."""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import pytest
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


def _random_opt(folder: Path) -> Path:
    """A two-layer OPT with random fp16 weights (safetensors) and tokenized calibration, built in a second."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=2, vocab_size=128,
                       max_position_embeddings=64, word_embed_proj_dim=64)
    torch.manual_seed(0)
    OPTForCausalLM(config).half().save_pretrained(folder)
    save_file({"input_ids": torch.randint(0, 128, (4, 32))}, str(folder / "calib.safetensors"))
    return folder


def _mappings_of(path: Path) -> int:
    with open("/proc/self/maps", encoding="utf-8") as handle:
        return sum(line.rstrip("\n").endswith(str(path.resolve())) for line in handle)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc/self/maps (Linux)")
def test_source_closes_its_files_after_each_module(tmp_path: Path) -> None:
    from gptq_tools.quant.source import SourceModel

    model = _random_opt(tmp_path / "opt")
    weights = model / "model.safetensors"
    source = SourceModel(model, dtype=torch.float32)
    for index in range(source.num_layers()):
        layer = f"{source.spec.layers_path}.{index}"
        source.load_module(layer, torch.device("cpu"))
        source.unload_module(layer)
        # an open handle maps the whole file and keeps every tensor read through it resident: held for the
        # run, the process's resident memory grew by each layer's bytes until it held the whole source
        assert _mappings_of(weights) == 0


AFTER_QUANTIZE = """
import sys, torch
from gptq_tools.quant.config import QuantizeConfig
from gptq_tools.quant.driver import quantize_model
from gptq_tools.quant.memory import anonymous_bytes
model, out = sys.argv[1:3]
quantize_model(model, out, calibration=model + "/calib.safetensors", config=QuantizeConfig(group_size=32),
               nsamples=4, seqlen=32, single_file=True)
first = torch.ones(2 << 20)  # 8 MiB, mapped; glibc's dynamic threshold would rise to 8 MiB when it is freed
del first
blocks = [torch.ones(1 << 19) for _ in range(64)]  # 64 x 2 MiB, every one written (resident)
before = anonymous_bytes()
del blocks[::2]  # 32 of them, each between two live ones: a heap could not give their pages back
print(before - anonymous_bytes())
"""


def test_quantize_returns_freed_blocks_at_once(tmp_path: Path) -> None:
    """The cause of issue 22: with glibc's dynamic mmap threshold, freed layer temporaries stayed in the heap
    until the trim after the layer, so a layer's peak held them too (and varied with the heap's layout).
    After a quantize run, freeing 2 MiB blocks must hand their memory back straight away."""
    import subprocess
    import sys

    model = _random_opt(tmp_path / "opt")
    env = {**os.environ, "GPTQ_TOOLS_DISABLE_PROGRESS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", AFTER_QUANTIZE, str(model), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    released = int(done.stdout.strip().splitlines()[-1])
    assert released >= 56 * 1024 * 1024, f"only {released >> 20} MiB of 64 MiB freed went back to the OS"
