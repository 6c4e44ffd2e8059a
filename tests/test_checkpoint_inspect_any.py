"""``inspect`` describes any safetensors folder or file (fp16 shards, index, dtypes, parameters, size), lists a
folder's tensors, and says "not a safetensors file" for JSON and other files."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest

from gptq_tools.checkpoint.inspect import inspect_path, sniff_non_safetensors
from gptq_tools.cli import main

from .tiny_gptq import tiny_config


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("fp16") / "opt"
    model = AutoModelForCausalLM.from_config(tiny_config("opt", tie=False)).half()
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder, sum(math.prod(t.shape) for t in model.state_dict().values())


def test_sharded_fp16_folder(fp16_folder: tuple[Path, int], capsys: pytest.CaptureFixture[str]) -> None:
    folder, parameters = fp16_folder
    report = inspect_path(folder)
    info = report["safetensors"]
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 2 and [f["name"] for f in info["files"]] == shards
    assert info["parameters"] == parameters and set(info["dtypes"]) == {"F16"}
    assert info["data_bytes"] == 2 * parameters and info["gptq_modules"] == 0
    assert report["index"]["files"] == shards and report["index"]["total_size"] == 2 * parameters
    assert report["size"] == sum(p.stat().st_size for p in folder.iterdir()) and report["problems"] == []
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{folder}: folder, " in out and "model type: opt" in out and "architectures: OPTForCausalLM" in out
    tensors = len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    assert f"safetensors: {len(shards)} file(s), {tensors} tensors" in out
    assert f"({parameters}) parameters" in out and "dtypes: F16 " in out
    assert "index: model.safetensors.index.json, " in out


def test_tensors_listed_for_a_folder(fp16_folder: tuple[Path, int], capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = fp16_folder
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert main(["inspect", str(folder), "--tensors", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["safetensors"]["tensor_list"]
    assert {t["name"]: t["file"] for t in listed} == index
    assert main(["inspect", str(folder), "--tensors"]) == 0
    out = capsys.readouterr().out
    name, file = next(iter(index.items()))
    assert f"    {file}: {name}  F16 " in out


def test_index_naming_a_missing_shard_is_a_problem(fp16_folder: tuple[Path, int], tmp_path: Path) -> None:
    import shutil

    folder, _ = fp16_folder
    copy = shutil.copytree(folder, tmp_path / "copy")
    last = sorted(copy.glob("*.safetensors"))[-1]
    last.unlink()
    problems = inspect_path(copy)["problems"]
    assert any(f"names {last.name}, which is not in the folder; download the missing shard(s)" in p
               for p in problems)


@pytest.mark.parametrize(("name", "content", "what"), [
    ("config.json", b'{"model_type": "opt"}', "JSON"),
    ("weights.bin", b"PK\x03\x04" + bytes(100), "a zip archive: a PyTorch .bin/.pt checkpoint is one"),
    ("old.bin", b"\x80\x02}q\x00" + bytes(50), "a Python pickle"),
    ("notes.txt", b"hello\n", "text"),
    ("model.gguf", b"GGUF" + bytes(100), "GGUF"),
])
def test_other_files_are_named(tmp_path: Path, name: str, content: bytes, what: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert sniff_non_safetensors(path) == what
    assert main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM: {path}: not a safetensors file ({what}); inspect reads .safetensors files" in out
    assert "header length" not in out


def test_real_zip_is_recognised(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "model.pt", "w") as archive:
        archive.writestr("data.pkl", b"x")
    assert sniff_non_safetensors(tmp_path / "model.pt") == "a zip archive: a PyTorch .bin/.pt checkpoint is one"
