"""The planner: caps parsing, the BLOOMZ-176B preset on 2x80 and 3x48 GB, refusals, checkpoint folders, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptq_tools.cli import main
from gptq_tools.errors import CheckpointError, UsageError
from gptq_tools.files.safetensors_format import read_header
from gptq_tools.runtime.plan import (
    GiB,
    ModelLayout,
    PlanOptions,
    load_layout,
    parse_gpus,
    parse_max_memory,
    place_layout,
    plan_placement,
)
from gptq_tools.units import parse_size

from .tiny_gptq import build_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET = "bloomz-176b-gptq"


@pytest.fixture(scope="module")
def bloomz() -> ModelLayout:
    return load_layout(PRESET, options=PlanOptions())[0]


# ---------------------------------------------------------------------------------------------- caps
def test_parse_max_memory_units() -> None:
    assert parse_max_memory("0=60GiB,1=79GiB,cpu=100GB") == {0: 60 * GiB, 1: 79 * GiB, "cpu": 100 * 10**9}
    assert parse_max_memory("cuda:1=30GiB, cpu=2.5GiB") == {1: 30 * GiB, "cpu": int(2.5 * GiB)}
    assert parse_max_memory("0=4096") == {0: 4096}  # bare numbers: bytes, as accelerate's ints
    assert parse_max_memory({0: "500MiB", "disk": 1000}) == {0: 500 * 1024**2, "disk": 1000}  # ints: bytes
    assert parse_max_memory(None) == {}


@pytest.mark.parametrize("spec,message", [
    ("0:60GiB", r"'0:60GiB' is not DEVICE=SIZE"),
    ("tpu=4GiB", r"unknown device 'tpu'"),
    ("0=4GiB,cuda:0=5GiB", r"device 0 is given twice"),
    ("0=four", r"max_memory\[0\]: 'four' is not a size"),
    ("0=", r"'0=' is not DEVICE=SIZE"),
])
def test_parse_max_memory_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_max_memory(spec)


def test_parse_gpus() -> None:
    assert parse_gpus("2x80GB") == {0: 80 * 10**9, 1: 80 * 10**9}
    assert parse_gpus("1x80GiB,2x48GiB") == {0: 80 * GiB, 1: 48 * GiB, 2: 48 * GiB}
    assert parse_gpus("24GiB") == {0: 24 * GiB}
    with pytest.raises(UsageError, match=r"--gpus '0x80GB' is not COUNTxSIZE|'0x80GB' is not COUNTxSIZE"):
        parse_gpus("0x80GB")
    with pytest.raises(UsageError, match="not a size"):
        parse_gpus("2xlots")


# --------------------------------------------------------------------------------------- BLOOMZ-176B
def check_consistent(placement, layout: ModelLayout) -> None:
    """Every cap holds weights + headroom; modules keep execution order; every block is placed once."""
    placed = [m for device in placement.devices.values() for m in device.modules]
    assert sorted(placed) == sorted(b.name for b in layout.blocks)
    for device in placement.devices.values():
        assert device.weight_bytes + device.reserved_bytes <= device.cap_bytes
    layer_devices = [placement.device_map[f"transformer.h.{i}"] for i in range(70)]
    assert layer_devices == sorted(layer_devices)  # contiguous runs, GPU 0 first


def test_bloomz_on_two_80gb_gpus(bloomz: ModelLayout) -> None:
    placement = place_layout(bloomz, preset_plan("2x80GB"), PlanOptions())
    assert placement.fits, placement.reason
    check_consistent(placement, bloomz)
    gpu0, gpu1 = placement.devices["0"], placement.devices["1"]
    # the embedding and the tied head share GPU 0, which also holds the output logits
    assert {"transformer.word_embeddings", "lm_head"} <= set(gpu0.modules)
    assert gpu0.reserved["output_logits"] == 2048 * 250880 * 4
    assert "transformer.ln_f" in gpu1.modules
    # no largest-layer reserve: GPU 0 is filled to within one layer of its cap
    layer = next(b.weight_bytes for b in bloomz.blocks if b.name == "transformer.h.0")
    assert gpu0.free_bytes < layer + 2 * 2048 * 14336 * 2
    assert "offload_staging" not in gpu0.reserved
    assert 6.5 * GiB < bloomz.blocks[0].weight_bytes < 7 * GiB  # the 7.19 GB embedding
    assert 87 * GiB < bloomz.total_weight_bytes < 87.5 * GiB


def test_bloomz_on_three_48gb_gpus(bloomz: ModelLayout) -> None:
    placement = place_layout(bloomz, preset_plan("3x48GB"), PlanOptions())
    assert placement.fits, placement.reason
    check_consistent(placement, bloomz)
    assert [len(placement.devices[k].modules) > 0 for k in "012"] == [True, True, True]


def preset_plan(name: str) -> dict:
    from gptq_tools.checkpoint.presets import load_preset

    return parse_max_memory(load_preset(PRESET).memory_plans[name])


def test_bloomz_refused_on_two_40gib_gpus_with_smallest_fix(bloomz: ModelLayout) -> None:
    placement = place_layout(bloomz, {0: 40 * GiB, 1: 40 * GiB}, PlanOptions())
    assert not placement.fits
    assert "the model does not fit" in placement.reason and "starting with transformer.h." in placement.reason
    assert "smallest change that fits: raise GPU 1 to" in placement.suggestion
    assert "or offload to the CPU with cpu=" in placement.suggestion
    raised = parse_size(placement.suggestion.split("raise GPU 1 to ")[1].split(" ")[0])
    exact = int(placement.suggestion.split("; ")[1].split(" bytes exactly")[0])  # to the byte, not 64 MiB steps
    assert place_layout(bloomz, {0: 40 * GiB, 1: raised}, PlanOptions()).fits
    assert place_layout(bloomz, {0: 40 * GiB, 1: exact}, PlanOptions()).fits
    assert not place_layout(bloomz, {0: 40 * GiB, 1: exact - 1}, PlanOptions()).fits
    assert 0 <= raised - exact < 0.01 * GiB


def test_longer_sequences_need_more_headroom(bloomz: ModelLayout) -> None:
    short = place_layout(bloomz, {0: 60 * GiB, 1: 79 * GiB}, PlanOptions(seq_len=512))
    long = place_layout(bloomz, {0: 60 * GiB, 1: 79 * GiB}, PlanOptions(seq_len=8192))
    assert short.fits and not long.fits
    assert short.devices["0"].reserved_bytes < 5 * GiB


def test_offload_to_cpu_reserves_staging_on_the_main_gpu(bloomz: ModelLayout) -> None:
    placement = place_layout(bloomz, {0: 40 * GiB, 1: 40 * GiB, "cpu": 64 * GiB}, PlanOptions())
    assert placement.fits
    cpu_layers = placement.devices["cpu"].modules
    assert cpu_layers and all(m.startswith("transformer.") or m == "lm_head" for m in cpu_layers)
    largest = max(b.weight_bytes for b in bloomz.blocks if b.name in cpu_layers)
    assert placement.devices["0"].reserved["offload_staging"] == largest


def test_plan_placement_json_shape() -> None:
    data = plan_placement(PRESET, max_memory="0=60GiB,1=79GiB").to_json()
    assert data["fits"] is True
    for device in ("0", "1"):
        assert set(data["devices"][device]) >= {"cap_bytes", "weight_bytes", "reserved_bytes", "modules"}
    assert data["devices"]["0"]["cap_bytes"] == 60 * GiB
    assert data["device_map"]["transformer.h.0"] == 0


# -------------------------------------------------------------------------------------- folders
def test_plan_from_checkpoint_folder_uses_header_sizes(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", tie=True, with_lm_head=False)
    header = read_header(checkpoint.folder / checkpoint.weight_name)
    placement = plan_placement(checkpoint.folder, max_memory="cpu=1GiB")
    assert placement.fits
    assert placement.total_weight_bytes == sum(entry.nbytes for entry in header.tensors.values())


def test_plan_folder_with_config_mismatch(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "bloom")
    config = json.loads((checkpoint.folder / "config.json").read_text())
    config["n_layer"] = 3
    (checkpoint.folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json says 3 layers but the weights hold 2 \(transformer.h.0"):
        plan_placement(checkpoint.folder, max_memory="cpu=1GiB")


def test_unknown_preset() -> None:
    with pytest.raises(UsageError, match="unknown preset 'no-such-model'"):
        plan_placement("no-such-model", max_memory="0=10GiB")


# ------------------------------------------------------------------------------------------ CLI
def test_cli_plan_json_fits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", PRESET, "--max-memory", "0=30GiB,1=47GiB,2=47GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and set(data["devices"]) == {"0", "1", "2"}


def test_cli_plan_refusal_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", PRESET, "--gpus", "2x40GiB"]) == 1
    out = capsys.readouterr().out
    assert "the model does not fit" in out and "smallest change that fits: raise GPU 1 to" in out


def test_cli_plan_needs_one_cap_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", PRESET]) == 2
    assert "give exactly one of --max-memory" in capsys.readouterr().err


def test_cli_plan_entry_point_text() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "gptq_tools", "plan", PRESET, "--gpus", "2x80GB"],
                            check=False, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "reserved: cuda_context 1.00 GiB" in result.stdout
    assert result.stdout.rstrip().endswith("fits")
