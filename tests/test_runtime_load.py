"""load_quantized: logits equal a float model of the dequantized weights; layouts, caps, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptq_tools.checkpoint.architectures import get_arch
from gptq_tools.errors import (
    CheckpointError,
    ChecksumMismatchError,
    PlacementError,
    UnsafeCheckpointError,
    UsageError,
)
from gptq_tools.runtime.load import load_quantized
from gptq_tools.runtime.qlinear import QuantLinear

from .tiny_gptq import TinyCheckpoint, build_tiny_checkpoint, reference_model


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


def assert_matches_reference(model: torch.nn.Module, checkpoint: TinyCheckpoint) -> None:
    """Loading is checked exactly: these models load with the exact reference kernel (``kernel="torch"``);
    the fast kernels' bf16 results are checked against it in ``tests/test_runtime_kernels.py``."""
    expected = logits(reference_model(checkpoint))
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["opt", "bloom"])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("desc_act", [False, True])
def test_logits_equal_dequantized_float_model(tmp_path: Path, model_type: str, checkpoint_format: str,
                                              desc_act: bool) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", model_type, desc_act=desc_act,
                                       checkpoint_format=checkpoint_format, sym=checkpoint_format == "gptq")
    model = load_quantized(checkpoint.folder, dtype=torch.float32, kernel="torch")
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * len(get_arch(model_type).quantized_linears)  # every target linear, 2 layers
    assert all(m.checkpoint_format == checkpoint_format for m in quantized)
    assert any(m.input_perm is not None for m in quantized) == desc_act
    assert_matches_reference(model, checkpoint)


def test_llama_with_grouped_kv_heads_and_rotary_buffers(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "llama", desc_act=True, tie=False)
    assert_matches_reference(load_quantized(checkpoint.folder, dtype=torch.float32, kernel="torch"), checkpoint)


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, -1), (8, 16)])
def test_other_bit_widths_and_groups(tmp_path: Path, bits: int, group_size: int) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", bits=bits, group_size=group_size, desc_act=True)
    assert_matches_reference(load_quantized(checkpoint.folder, dtype=torch.float32, kernel="torch"), checkpoint)


@pytest.mark.parametrize("tie,with_lm_head", [(True, False), (True, True), (False, True)])
def test_with_and_without_lm_head(tmp_path: Path, tie: bool, with_lm_head: bool) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "bloom", tie=tie, with_lm_head=with_lm_head)
    model = load_quantized(checkpoint.folder, dtype=torch.float32, kernel="torch")
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tie
    assert_matches_reference(model, checkpoint)


def test_untied_model_without_lm_head_is_refused(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", tie=False, with_lm_head=False)
    with pytest.raises(CheckpointError, match="tensor 'lm_head.weight' is missing from the checkpoint"):
        load_quantized(checkpoint.folder)


def test_joined_sharded_and_parts_give_identical_logits(tmp_path: Path) -> None:
    pytest.importorskip("gptq_tools.files.parts")
    results = []
    for layout in ("single", "sharded", "parts"):
        checkpoint = build_tiny_checkpoint(tmp_path / layout, "opt", desc_act=True, layout=layout)
        results.append(logits(load_quantized(checkpoint.folder, dtype=torch.float32, kernel="torch")))
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], results[2])


def test_parts_hash_checked_from_manifest(tmp_path: Path) -> None:
    pytest.importorskip("gptq_tools.files.parts")
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", layout="parts")
    manifest = checkpoint.folder / "SHA256SUMS"
    manifest.write_text(f"{checkpoint.sha256}  {checkpoint.weight_name}\n", encoding="utf-8")
    load_quantized(checkpoint.folder)  # the right hash loads
    manifest.write_text(f"{'0' * 64}  {checkpoint.weight_name}\n", encoding="utf-8")
    with pytest.raises(ChecksumMismatchError, match=r"SHA256 of 3 parts of gptq_model-4bit-32g.safetensors is "):
        load_quantized(checkpoint.folder)
    load_quantized(checkpoint.folder, verify_hash=False)  # explicitly skipped


def test_expected_sha256_argument(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    load_quantized(checkpoint.folder, expected_sha256=checkpoint.sha256)
    with pytest.raises(ChecksumMismatchError, match="expected " + "f" * 64):
        load_quantized(checkpoint.folder, expected_sha256="f" * 64)


def cpu_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values() if t.device.type == "cpu"}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_cpu_cap_respected_and_rest_offloaded_to_disk(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", desc_act=True, layers=4)
    full = load_quantized(checkpoint.folder, dtype=torch.float32, kernel="torch", max_memory={"cpu": "1GiB"})
    total = full.gptq_placement.total_weight_bytes
    cap = total * 2 // 3
    offload = tmp_path / "offload"
    # the reference kernel keeps the checkpoint buffers, so the resident bytes are the plan's exactly
    model = load_quantized(checkpoint.folder, dtype=torch.float32, max_memory={"cpu": cap},
                           offload_folder=offload, kernel="torch")
    placement = model.gptq_placement
    assert placement.fits
    assert placement.devices["cpu"].weight_bytes <= cap
    assert any(".layers." in name for name in placement.devices["cpu"].modules)
    assert 0 < placement.devices["disk"].weight_bytes
    assert cpu_bytes(model) == placement.devices["cpu"].weight_bytes  # exactly what the plan put there
    disk_layer = next(n for n in placement.devices["disk"].modules if ".layers." in n)
    assert model.get_submodule(disk_layer).fc1.qweight.device.type == "meta"
    assert (offload / "index.json").is_file()
    assert_matches_reference(model, checkpoint)


def test_cap_too_small_without_offload_folder_says_what_fits(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    with pytest.raises(PlacementError, match=r"does not fit: .* have no room.*smallest change that fits: raise cpu"):
        load_quantized(checkpoint.folder, max_memory={"cpu": "10KiB"})


def test_explicit_device_map(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "bloom", desc_act=True)
    device_map = {"transformer.word_embeddings": "cpu", "transformer.word_embeddings_layernorm": "cpu",
                  "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"}
    model = load_quantized(checkpoint.folder, dtype=torch.float32, kernel="torch", device_map=device_map,
                           offload_folder=tmp_path / "off")
    assert model.transformer.h[1].mlp.dense_h_to_4h.qweight.device.type == "meta"
    assert_matches_reference(model, checkpoint)


def test_half_precision_default_runs_generate(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", desc_act=True)
    model = load_quantized(checkpoint.folder)
    assert model.get_input_embeddings().weight.dtype == torch.float16
    out = model.generate(torch.tensor([[2, 5, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


# ------------------------------------------------------------------------------------------ bad input
def test_config_and_tensors_disagree(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    quantize_config = json.loads((checkpoint.folder / "quantize_config.json").read_text())
    quantize_config["bits"] = 8
    (checkpoint.folder / "quantize_config.json").write_text(json.dumps(quantize_config))
    with pytest.raises(CheckpointError, match=r"tensor 'model.decoder.layers.0.self_attn.k_proj.qweight' has shape "
                                              r"\(8, 64\) in the checkpoint but the config and quantize_config give "
                                              r"\(16, 64\)"):
        load_quantized(checkpoint.folder)


def test_extra_tensors_are_a_disagreement(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    path = checkpoint.folder / checkpoint.weight_name
    tensors = load_file(path)
    tensors["model.decoder.layers.7.fc1.qweight"] = torch.zeros(8, 128, dtype=torch.int32)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) the model does not use .*layers.7.fc1.qweight"):
        load_quantized(checkpoint.folder)


def test_missing_shard(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", layout="sharded")
    (checkpoint.folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing shard\(s\) model-00002-of-00002.safetensors named in "
                                              r"model.safetensors.index.json"):
        load_quantized(checkpoint.folder)


def test_pickled_weights_refused_unless_allowed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", desc_act=True)
    path = checkpoint.folder / checkpoint.weight_name
    torch.save(load_file(path), checkpoint.folder / "pytorch_model.bin")
    path.unlink()
    with pytest.raises(UnsafeCheckpointError, match=r"only pickled weights \(pytorch_model.bin\).*allow_pickle=True"):
        load_quantized(checkpoint.folder)
    model = load_quantized(checkpoint.folder, dtype=torch.float32, kernel="torch", allow_pickle=True)
    assert_matches_reference(model, checkpoint)


def test_device_that_does_not_exist(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    count = torch.cuda.device_count()
    with pytest.raises(UsageError, match=f"device {count + 1} does not exist: this machine has {count} CUDA"):
        load_quantized(checkpoint.folder, max_memory={count + 1: "10GiB", "cpu": "1GiB"})


def test_malformed_memory_string(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    with pytest.raises(UsageError, match=r"max_memory\[0\]: 'lots' is not a size"):
        load_quantized(checkpoint.folder, max_memory="0=lots")


def test_remote_code_is_off_by_default(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    config = json.loads((checkpoint.folder / "config.json").read_text())
    config.update(model_type="my_custom_model", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (checkpoint.folder / "config.json").write_text(json.dumps(config))
    (checkpoint.folder / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ValueError, match=r"names remote code \(auto_map\); gptq-tools never runs code from a "
                                         r"repository"):
        load_quantized(checkpoint.folder)


def test_not_a_gptq_folder(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    (checkpoint.folder / "quantize_config.json").unlink()
    config = json.loads((checkpoint.folder / "config.json").read_text())
    config.pop("quantization_config")
    (checkpoint.folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no quantize_config.json and no quantization_config"):
        load_quantized(checkpoint.folder)


def test_checkpoint_files_are_never_modified(tmp_path: Path) -> None:
    import hashlib

    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", desc_act=True)
    path = checkpoint.folder / checkpoint.weight_name
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    model = load_quantized(checkpoint.folder, dtype=torch.float16)  # act-order rows are permuted in place
    assert any(m.input_perm is not None for m in model.modules() if isinstance(m, QuantLinear))
    logits(model)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before == checkpoint.sha256


def _tiny_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, digest: str) -> None:
    presets = tmp_path / "configs" / "presets"
    presets.mkdir(parents=True, exist_ok=True)
    preset = {"name": "tiny", "repo_id": "test/tiny", "branches": {"main": {"files": {name: {"sha256": digest}}}}}
    (presets / "tiny.json").write_text(json.dumps(preset))
    monkeypatch.setenv("GPTQ_TOOLS_CONFIGS", str(tmp_path / "configs"))


def test_preset_hash_does_not_apply_to_any_file_of_that_name(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # AutoGPTQ's standard name (our own quantize --single-file writes it): a preset publishing a hash for
    # that name must not condemn every such checkpoint as damaged.
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    _tiny_preset(tmp_path, monkeypatch, checkpoint.weight_name, "e" * 64)
    load_quantized(checkpoint.folder)


def test_named_preset_hash_applies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    _tiny_preset(tmp_path, monkeypatch, checkpoint.weight_name, "e" * 64)
    with pytest.raises(ChecksumMismatchError, match="expected " + "e" * 64):
        load_quantized(checkpoint.folder, preset="tiny")
    _tiny_preset(tmp_path, monkeypatch, checkpoint.weight_name, checkpoint.sha256)
    load_quantized(checkpoint.folder, preset="tiny")


@pytest.mark.parametrize(("recorded_repo", "refused"), [("test/tiny", True), ("someone/else", False)])
def test_preset_hash_applies_where_our_download_recorded_its_repository(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded_repo: str, refused: bool) -> None:
    from gptq_tools.hub.state import LocalState

    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    _tiny_preset(tmp_path, monkeypatch, checkpoint.weight_name, "e" * 64)
    LocalState(checkpoint.folder).save_listing("main", {"repo_id": recorded_repo, "commit": "c" * 40,
                                                        "endpoint": "", "files": []})
    if refused:
        with pytest.raises(ChecksumMismatchError, match="expected " + "e" * 64):
            load_quantized(checkpoint.folder)
    else:
        load_quantized(checkpoint.folder)


def test_explicit_device_map_must_cover_every_module(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    with pytest.raises(UsageError, match=r"device_map has no entry for tensor 'model.decoder.embed_tokens.weight'"):
        load_quantized(checkpoint.folder, device_map={"model.decoder.layers": "cpu"})


@pytest.mark.parametrize("removed,message", [
    ("b", r"is missing part\(s\) 'b'"),  # a gap in the letters
    ("c", r"part\(s\) after .*split-b.safetensors are missing: the set is \d+ bytes short"),  # only the header
                                                                                            # reveals a lost last part
])
def test_missing_part(tmp_path: Path, removed: str, message: str) -> None:
    from gptq_tools.errors import PartSetError

    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", layout="parts")
    stem = checkpoint.weight_name.removesuffix(".safetensors")
    (checkpoint.folder / f"{stem}.JOINBEFOREUSE.split-{removed}.safetensors").unlink()
    with pytest.raises(PartSetError, match=message):
        load_quantized(checkpoint.folder)


def test_disk_in_device_map_needs_offload_folder(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt")
    with pytest.raises(UsageError, match="sends modules to 'disk' but no offload_folder was given"):
        load_quantized(checkpoint.folder, device_map={"": "disk"})
