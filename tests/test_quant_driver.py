"""The streaming driver end to end on tiny OPT/BLOOM models: format, quality, resume, bad input."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gptq_tools.checkpoint.tiny import TinySpec, build_tiny_model
from gptq_tools.cli import main as cli_main
from gptq_tools.errors import (
    CalibrationError,
    CheckpointError,
    InsufficientSpaceError,
    OutputExistsError,
    QuantizationError,
    UnsupportedArchitectureError,
    UsageError,
)
from gptq_tools.quant import driver as driver_module
from gptq_tools.quant.config import QuantizeConfig
from gptq_tools.quant.driver import quantize_model
from gptq_tools.quant.evaluate import folder_perplexity
from gptq_tools.quant.gptq import CholeskyFailure

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC = TinySpec(hidden=64, layers=2, heads=2, vocab_size=512, seqlen=64, batch=8, steps=40)
FAST = {"nsamples": 8, "seqlen": 64}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root / arch, spec=SPEC) for arch in ("opt", "bloom")}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("arch", ["opt", "bloom"])
def test_checkpoint_format_and_quality(tiny_models: dict[str, Path], tmp_path: Path, arch: str) -> None:
    model = tiny_models[arch]
    out = tmp_path / "out"
    summary = quantize_model(model, out, calibration=model / "train.txt", config=QuantizeConfig(group_size=32),
                             **FAST)
    # every linear: GPTQ error below round-to-nearest on the real calibration activations
    assert len(summary.linears) == 2 * (6 if arch == "opt" else 4)
    assert all(report.error < report.rtn_error for report in summary.linears)
    assert not summary.fallbacks
    tensors = _tensors(out)
    prefix = "model.decoder.layers.0.fc1" if arch == "opt" else "transformer.h.0.mlp.dense_h_to_4h"
    inputs, outputs = 64, 256
    assert tensors[f"{prefix}.qweight"].dtype == torch.int32
    assert tensors[f"{prefix}.qweight"].shape == (inputs // 8, outputs)
    assert tensors[f"{prefix}.qzeros"].dtype == torch.int32 and tensors[f"{prefix}.qzeros"].shape == (2, outputs // 8)
    assert tensors[f"{prefix}.scales"].dtype == torch.float16 and tensors[f"{prefix}.scales"].shape == (2, outputs)
    assert tensors[f"{prefix}.g_idx"].dtype == torch.int32 and tensors[f"{prefix}.g_idx"].shape == (inputs,)
    assert tensors[f"{prefix}.bias"].dtype == torch.float16
    assert f"{prefix}.weight" not in tensors
    assert "lm_head.weight" in tensors  # written although tied
    low_nibbles = tensors[f"{prefix}.qzeros"] & 0xF
    assert torch.equal(low_nibbles, torch.full_like(low_nibbles, 7))  # symmetric v1 stores zero 8 as 7
    config = json.loads((out / "config.json").read_text())
    quant = json.loads((out / "quantize_config.json").read_text())
    assert config["quantization_config"] == quant
    assert quant["quant_method"] == "gptq" and quant["checkpoint_format"] == "gptq" and quant["group_size"] == 32
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert (out / "tokenizer.json").is_file()
    sums = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {p.name for p in out.iterdir()} - {"SHA256SUMS"}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # staging folder renamed away
    # the project's own structural validator and checksum verifier accept the checkpoint
    from gptq_tools.checkpoint.validate import validate_checkpoint

    report = validate_checkpoint(out)
    assert len(report.modules) == len(summary.linears)
    assert cli_main(["verify", "--structure", str(out)]) == 0
    assert cli_main(["verify", "--manifest", str(out / "SHA256SUMS")]) == 0
    text = (model / "eval.txt").read_text()[:20000]
    fp16 = folder_perplexity(model, text, seqlen=64)
    quantized = folder_perplexity(out, text, seqlen=64)
    assert quantized < fp16 * 1.05


def test_single_file_sharding_and_asym_v2(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["bloom"]
    single = tmp_path / "single"
    summary = quantize_model(model, single, calibration=model / "train.txt", single_file=True,
                             config=QuantizeConfig(group_size=-1, desc_act=False), **FAST)
    assert "model.safetensors" in summary.files
    assert json.loads((single / "quantize_config.json").read_text())["model_file_base_name"] == "model"
    sharded = tmp_path / "sharded"
    quantize_model(model, sharded, calibration=model / "train.txt", max_shard_size="100KB",
                   config=QuantizeConfig(group_size=16, sym=False, checkpoint_format="gptq_v2"), **FAST)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert json.loads((sharded / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    from gptq_tools.checkpoint.validate import validate_checkpoint

    validate_checkpoint(single)
    validate_checkpoint(sharded)
    assert folder_perplexity(sharded, (model / "eval.txt").read_text()[:8000], seqlen=64) < 1e4


def test_resume_after_exception_is_byte_identical(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["opt"]
    kwargs = dict(calibration=model / "train.txt", config=QuantizeConfig(group_size=32), **FAST)
    quantize_model(model, tmp_path / "straight", **kwargs)

    def crash(index: int) -> None:
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, tmp_path / "resumed", on_layer_done=crash, **kwargs)
    assert not (tmp_path / "resumed").exists()
    with pytest.raises(QuantizationError, match="pass --resume to continue it"):
        quantize_model(model, tmp_path / "resumed", **kwargs)
    with pytest.raises(QuantizationError, match="the interrupted run used another model, calibration or settings"):
        quantize_model(model, tmp_path / "resumed", resume=True, **{**kwargs, "config": QuantizeConfig(group_size=64)})
    summary = quantize_model(model, tmp_path / "resumed", resume=True, **kwargs)
    assert summary.resumed_from_layer == 1
    assert len(summary.linears) == 12
    for name in ("model-00001-of-00001.safetensors", "SHA256SUMS", "config.json"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def test_resume_after_sigkill(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["bloom"]
    script = (
        "import os, signal, sys\n"
        "from gptq_tools.quant.driver import quantize_model\n"
        "from gptq_tools.quant.config import QuantizeConfig\n"
        "def kill(index):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"quantize_model({str(model)!r}, {str(tmp_path / 'out')!r}, calibration={str(model / 'train.txt')!r},\n"
        "               config=QuantizeConfig(group_size=32), nsamples=8, seqlen=64, on_layer_done=kill)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300, check=False)
    assert done.returncode == -9
    assert not (tmp_path / "out").exists()
    argv = [sys.executable, "-m", "gptq_tools", "quantize", str(model), "-o", str(tmp_path / "out"), "--calibration",
            str(model / "train.txt"), "--group-size", "32", "--nsamples", "8", "--seqlen", "64", "--resume"]
    resumed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at layer 1" in resumed.stdout
    straight = tmp_path / "straight"
    quantize_model(model, straight, calibration=model / "train.txt", config=QuantizeConfig(group_size=32), **FAST)
    assert (straight / "SHA256SUMS").read_bytes() == (tmp_path / "out" / "SHA256SUMS").read_bytes()


def test_cholesky_failure_falls_back_to_rtn(tiny_models: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    real = driver_module.gptq_quantize

    def flaky(W: torch.Tensor, H: torch.Tensor, config: QuantizeConfig, *, name: str):
        if name.endswith("layers.1.fc2"):
            raise CholeskyFailure(f"{name}: Hessian is not positive definite even with damp_percent=1")
        return real(W, H, config, name=name)

    monkeypatch.setattr(driver_module, "gptq_quantize", flaky)
    model = tiny_models["opt"]
    code = cli_main(["quantize", str(model), "-o", str(tmp_path / "out"), "--calibration", str(model / "train.txt"),
                     "--group-size", "32", "--nsamples", "8", "--seqlen", "64", "--method", "gptq"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "round-to-nearest fallback (Cholesky failed): model.decoder.layers.1.fc2" in printed
    assert "quantized 12 linears in 2 layers" in printed


def test_fp_target_raises_dampening_and_falls_back_loudly(tiny_models: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    real = driver_module.fp_target_quantize

    def indefinite(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, config: QuantizeConfig, *, name: str):
        if name.endswith("layers.0.fc1"):  # not positive definite at damp 0.01: the solver must raise it
            H = H.clone()
            H[0, 0] = -0.05 * float(torch.diag(H).mean())
        if name.endswith("layers.1.fc2"):
            raise CholeskyFailure(f"{name}: Hessian is not positive definite even with damp_percent=1")
        return real(W, H, D, config, name=name)

    monkeypatch.setattr(driver_module, "fp_target_quantize", indefinite)
    model = tiny_models["opt"]
    code = cli_main(["quantize", str(model), "-o", str(tmp_path / "out"), "--calibration", str(model / "train.txt"),
                     "--group-size", "32", "--nsamples", "8", "--seqlen", "64", "--method", "fp-target",
                     "--target-alpha", "0.5", "--scale-search", "mse"])
    assert code == 0
    meta = json.loads((tmp_path / "out" / "quantize_config.json").read_text())["meta"]
    assert (meta["method"], meta["target_alpha"], meta["scale_search"]) == ("fp-target", 0.5, "mse")
    captured = capsys.readouterr()
    printed, logged = captured.out, captured.err
    assert "raised dampening (Cholesky failed at damp 0.01): 1 linear: model.decoder.layers.0.fc1" in printed
    assert "round-to-nearest fallback (Cholesky failed): model.decoder.layers.1.fc2" in printed
    assert logged.count("Cholesky needed damp_percent") == 1  # logged once, for the one linear
    assert "model.decoder.layers.0.fc1: Cholesky needed damp_percent" in logged
    assert "model.decoder.layers.1.fc2: Hessian is not positive definite even with damp_percent=1; falling back " \
           "to round-to-nearest for this linear" in logged


def test_disk_full_leaves_no_output(tiny_models: dict[str, Path], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import gptq_tools.quant.save as save_module

    real = save_module._save_safetensors

    def full(tensors: dict, path: Path) -> None:
        if path.name.startswith("model-"):
            save_module.raise_if_no_space(OSError(errno.ENOSPC, "No space left on device"), path)
        real(tensors, path)

    monkeypatch.setattr(save_module, "_save_safetensors", full)
    model = tiny_models["opt"]
    with pytest.raises(InsufficientSpaceError, match="the disk filled up while writing"):
        quantize_model(model, tmp_path / "out", calibration=model / "train.txt", config=QuantizeConfig(group_size=32),
                       **FAST)
    assert not (tmp_path / "out").exists()


def test_bad_input_messages(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["opt"]
    calib = model / "train.txt"
    with pytest.raises(UsageError, match="--group-size 48 does not divide the 64 inputs of self_attn.k_proj"):
        quantize_model(model, tmp_path / "a", calibration=calib, config=QuantizeConfig(group_size=48), **FAST)
    with pytest.raises(UsageError, match="--seqlen 4096 is longer than .* allows \\(512 positions\\)"):
        quantize_model(model, tmp_path / "b", calibration=calib, nsamples=2, seqlen=4096)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputExistsError, match="output folder is not empty"):
        quantize_model(model, tmp_path / "full", calibration=calib, **FAST)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CalibrationError, match="calibration file is empty"):
        quantize_model(model, tmp_path / "c", calibration=empty, **FAST)
    weird = tmp_path / "calib.parquet"
    weird.write_bytes(b"PAR1")
    with pytest.raises(CalibrationError, match="unknown calibration format '.parquet'"):
        quantize_model(model, tmp_path / "d", calibration=weird, **FAST)
    other = tmp_path / "t5"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(UnsupportedArchitectureError, match="architecture 't5' is not supported; supported model types: "
                                                           "bloom, gpt2, gpt_neox, llama"):
        quantize_model(other, tmp_path / "e", calibration=calib, **FAST)


@pytest.mark.parametrize("bad_id", [512, 10**6, -1])
def test_calibration_ids_outside_the_vocabulary_fail_before_the_staging_folder(
        tiny_models: dict[str, Path], tmp_path: Path, bad_id: int) -> None:
    from safetensors.torch import save_file

    calib = tmp_path / "ids.safetensors"
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    ids[3, 5] = bad_id
    save_file({"input_ids": ids}, str(calib))
    out = tmp_path / "out"
    with pytest.raises(CalibrationError, match=rf"ids.safetensors: token id {bad_id} is outside the vocabulary of "
                                               rf".* \(512 ids, 0 to 511\); the calibration was tokenized for another"):
        quantize_model(tiny_models["opt"], out, calibration=calib, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.safetensors"]  # no staging folder, no output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_fails_in_one_line_before_the_staging_folder(
        tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = cli_main(["quantize", str(tiny_models["opt"]), "-o", str(out), "--calibration",
                     str(tiny_models["opt"] / "train.txt"), "--device", "cuda"])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"gptq-tools: error: --device cuda: this machine has no CUDA device (torch {torch.__version__}"
        f"{'' if torch.version.cuda else ', built without CUDA'}); use --device cpu or run where a GPU is visible"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="--device 'gpu0' is not a device name"):
        quantize_model(tiny_models["opt"], out, calibration=tiny_models["opt"] / "train.txt", device="gpu0", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_lying_source_config_fails_before_a_model_is_built(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    model = Path(shutil.copytree(tiny_models["opt"], tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 10**6
    (model / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"config.json: num_hidden_layers=1000000 is out of range"):
        quantize_model(model, tmp_path / "out", calibration=model / "train.txt", **FAST)
    assert time.perf_counter() - started < 1.0
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for path in tiny_models["opt"].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.decoder.layers.1.fc1.weight"][0, 0] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match="tensor 'model.decoder.layers.1.fc1.weight' contains NaN or inf"):
        quantize_model(broken, tmp_path / "out", calibration=broken / "train.txt", config=QuantizeConfig(group_size=32),
                       **FAST)
    assert not (tmp_path / "out").exists()


def _random_model(family: str, folder: Path) -> Path:
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
    )

    configs = {
        "llama": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
        "gpt2": GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128),
        "gpt_neox": GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128),
    }
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(configs[family]).to(torch.float16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_other_families_from_the_table(tmp_path: Path, family: str) -> None:
    from safetensors.torch import save_file

    from gptq_tools.checkpoint.architectures import get_arch
    from gptq_tools.quant.evaluate import load_for_eval

    model = _random_model(family, tmp_path / "model")
    calib = tmp_path / "calib.safetensors"
    save_file({"input_ids": torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))}, str(calib))
    summary = quantize_model(model, tmp_path / "out", calibration=calib, nsamples=4, seqlen=32,
                             config=QuantizeConfig(group_size=32))
    spec = get_arch(family)
    assert len(summary.linears) == 2 * len(spec.quantized_linears)
    assert all(report.error < report.rtn_error for report in summary.linears)
    tensors = _tensors(tmp_path / "out")
    assert f"{spec.lm_head}.weight" in tensors
    first = f"{spec.layers_path}.0.{spec.quantized_linears[0]}"
    assert tensors[f"{first}.qweight"].shape[0] == 64 // 8  # packed along the 64 inputs (Conv1D included)
    with pytest.raises(UsageError, match="longer than"):
        quantize_model(model, tmp_path / "long", calibration=calib, nsamples=1, seqlen=129)
    load_for_eval(tmp_path / "out")  # the checkpoint loads back into the model with every tensor matched


def test_cli_options_reach_the_checkpoint(tiny_models: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    model = tiny_models["bloom"]
    out = tmp_path / "out"
    code = cli_main(["quantize", str(model), "-o", str(out), "--calibration", str(model / "train.txt"), "--bits", "8",
                     "--group-size", "-1", "--no-desc-act", "--asym", "--damp", "0.05", "--autogptq-name",
                     "--nsamples", "4", "--seqlen", "32"])
    assert code == 0
    quant = json.loads((out / "quantize_config.json").read_text())
    assert (quant["bits"], quant["group_size"], quant["desc_act"], quant["sym"], quant["damp_percent"]) == \
        (8, -1, False, False, 0.05)
    assert (out / "gptq_model-8bit--1g.safetensors").is_file()
    assert "layer  linears  err " in capsys.readouterr().out
    code = cli_main(["quantize", str(model), "-o", str(out), "--calibration", str(model / "train.txt")])
    assert code == 1
    expected = (f"gptq-tools: error: {out}: already holds a quantized checkpoint (quantize_config.json, SHA256SUMS); "
                f"--resume keeps it when every file matches SHA256SUMS (nothing is redone)")
    assert capsys.readouterr().err.strip().startswith(expected)


def test_resume_after_crash_while_publishing(tiny_models: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_models["opt"]
    kwargs = {"calibration": model / "train.txt", "config": QuantizeConfig(group_size=32), **FAST}

    def crash(staging: Path, output: Path) -> None:
        raise OSError(errno.EIO, "simulated crash before the final rename")

    monkeypatch.setattr(driver_module, "publish", crash)
    with pytest.raises(OSError, match="simulated crash"):
        quantize_model(model, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    summary = quantize_model(model, tmp_path / "out", resume=True, **kwargs)
    assert summary.resumed_from_layer == 2 and "SHA256SUMS" in summary.files
    quantize_model(model, tmp_path / "straight", **kwargs)
    assert (tmp_path / "out" / "SHA256SUMS").read_bytes() == (tmp_path / "straight" / "SHA256SUMS").read_bytes()


@pytest.mark.parametrize("arch", ["opt", "bloom"])
def test_project_loader_reads_our_checkpoint(tiny_models: dict[str, Path], tmp_path: Path, arch: str) -> None:
    from gptq_tools.quant.evaluate import load_for_eval
    from gptq_tools.runtime.load import load_quantized

    model = tiny_models[arch]
    out = tmp_path / "out"
    quantize_model(model, out, calibration=model / "train.txt", config=QuantizeConfig(group_size=16), **FAST)
    loaded = load_quantized(out, device_map="cpu", dtype=torch.float32)  # also checks SHA256SUMS
    ids = torch.arange(5, 69).unsqueeze(0)
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
        ours = load_for_eval(out)(input_ids=ids).logits
    assert torch.allclose(theirs.float(), ours, atol=1e-3, rtol=1e-3)


def test_resume_after_a_kill_while_removing_the_work_folder(tiny_models: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The run dies half-way through removing its work folder (state.json and a layer already gone):
    --resume must finish and publish the checkpoint, not fail on the half-removed work folder."""
    model = tiny_models["opt"]
    kwargs = {"calibration": model / "train.txt", "config": QuantizeConfig(group_size=32), "nsamples": 2,
              "seqlen": 16}
    real_rmtree = driver_module.rmtree

    def dies_half_way(path: Path) -> None:
        if Path(path).name != driver_module.WORK_DIR:
            real_rmtree(path)
            return
        (Path(path) / driver_module.STATE_NAME).unlink()
        (Path(path) / "layer-00000.safetensors").unlink()
        raise OSError(errno.EIO, "simulated kill while removing the work folder")

    monkeypatch.setattr(driver_module, "rmtree", dies_half_way)
    with pytest.raises(OSError, match="simulated kill"):
        quantize_model(model, tmp_path / "out", **kwargs)
    monkeypatch.undo()
    staging = driver_module._staging_folder(tmp_path / "out")
    assert (staging / driver_module.WORK_DIR / "layer-00001.safetensors").is_file()  # half removed
    summary = quantize_model(model, tmp_path / "out", resume=True, **kwargs)
    assert not staging.exists() and "SHA256SUMS" in summary.files
    quantize_model(model, tmp_path / "straight", **kwargs)
    assert (tmp_path / "out" / "SHA256SUMS").read_bytes() == (tmp_path / "straight" / "SHA256SUMS").read_bytes()
    # a rerun of the finished job says so
    argv = ["quantize", str(model), "-o", str(tmp_path / "out"), "--calibration", str(model / "train.txt"),
            "--group-size", "32", "--nsamples", "2", "--seqlen", "16", "--resume"]
    assert cli_main(argv) == 0
    assert capsys.readouterr().out.startswith(f"already quantized: {tmp_path / 'out'} is complete")
    (tmp_path / "out" / "config.json").write_text("{}")  # damaged: not a finished job any more
    assert cli_main(argv) == 1
    assert "if --resume refuses too, a file does not match (`gptq-tools verify -c" in capsys.readouterr().err


def test_staging_without_a_committed_layer_does_not_block_the_next_run(tiny_models: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """A run that failed before committing any layer (bad calibration, no CUDA) left its staging folder:
    the next, correct run starts without demanding --resume."""
    model = tiny_models["opt"]
    staging = driver_module._staging_folder(tmp_path / "out")
    (staging / driver_module.WORK_DIR).mkdir(parents=True)
    summary = quantize_model(model, tmp_path / "out", calibration=model / "train.txt", nsamples=2, seqlen=16,
                             config=QuantizeConfig(group_size=32), method="rtn")
    assert "SHA256SUMS" in summary.files and not staging.exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GPTQ_TOOLS_RUN_SLOW") != "1",
                    reason="27 runs of the quantize CLI (about 2-12 min); `make test-slow` runs it")
def test_quantize_survives_a_kill_at_each_step(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Kill right after every publish step (layer files, next inputs, state.json, removal of the consumed
    inputs, shards, index, configs, SHA256SUMS, work-folder removal, the final rename); --resume repairs it."""
    from tests.helpers import kill_at_each_step, snapshot

    model = tiny_models["opt"]
    steps = kill_at_each_step(
        lambda root: None,
        lambda root: ["quantize", str(model), "-o", str(root / "out"), "--calibration", str(model / "train.txt"),
                      "--group-size", "32", "--nsamples", "4", "--seqlen", "32", "--resume"],
        lambda root: (snapshot(root / "out"), sorted(p.name for p in root.iterdir())), base=tmp_path)
    kinds = [f"{s.split()[0]} {Path(s.split()[1]).name}" for s in steps]
    assert kinds == ["replace layer-00000.safetensors", "replace inputs-00001.safetensors", "replace state.json",
                     "replace layer-00001.safetensors", "replace state.json", "unlink inputs-00001.safetensors",
                     "replace model-00001-of-00001.safetensors", "replace model.safetensors.index.json",
                     "replace quantize_config.json", "replace config.json", "replace SHA256SUMS",
                     f"rmtree {driver_module.WORK_DIR}", "replace out"]
