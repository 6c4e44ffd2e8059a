"""Small builders shared by the tests (files are made by hand so every byte is known)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """A valid safetensors file holding ``tensors`` (numpy arrays), in the given order."""
    dtype_names = {"float16": "F16", "float32": "F32", "int32": "I32", "int64": "I64", "uint8": "U8"}
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype_names[str(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def raw_safetensors(path: Path, header: object, data: bytes = b"", *, header_bytes: bytes | None = None) -> Path:
    """A file with an arbitrary (possibly invalid) header and data buffer."""
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def random_model_file(path: Path, *, tensors: int = 12, size: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_safetensors(path, {f"layer.{i}.weight": rng.standard_normal((size, size)).astype(np.float32)
                                    for i in range(tensors)}, {"format": "pt"})


def split_bytes(source: Path, folder: Path, part_size: int, names: list[str] | None = None) -> list[Path]:
    """Byte-split like unix ``split``, named ``NAME.JOINBEFOREUSE.split-a.EXT`` unless ``names`` are given."""
    data = source.read_bytes()
    chunks = [data[i:i + part_size] for i in range(0, len(data), part_size)]
    stem, ext = source.name.rsplit(".", 1)
    names = names or [f"{stem}.JOINBEFOREUSE.split-{chr(97 + i)}.{ext}" for i in range(len(chunks))]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, chunk in zip(names, chunks):
        (folder / name).write_bytes(chunk)
        paths.append(folder / name)
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Name -> hash of every file in ``folder`` (to prove inputs were left untouched)."""
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GPTQ_TOOLS_DISABLE_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "gptq_tools", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout, check=False)


def write_fake_gptq_checkpoint(folder: Path, *, bits: int = 4, group_size: int = 32, desc_act: bool = False,
                               layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A structurally valid OPT-shaped GPTQ checkpoint (random integer weights), headers and configs only
    mattering: used to test validation, not inference."""
    import torch

    from gptq_tools.checkpoint.architectures import get_arch
    from gptq_tools.checkpoint.packing import pack_qweight, pack_qzeros

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    spec = get_arch("opt")
    shapes = {"self_attn.k_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
              "self_attn.q_proj": (hidden, hidden), "self_attn.out_proj": (hidden, hidden),
              "fc1": (hidden, 4 * hidden), "fc2": (4 * hidden, hidden)}
    tensors: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for linear in spec.quantized_linears:
            in_features, out_features = shapes[linear]
            groups = 1 if group_size == -1 else -(-in_features // group_size)
            prefix = f"{spec.layers_path}.{layer}.{linear}"
            intweight = torch.randint(0, 2**bits, (in_features, out_features), generator=generator)
            zeros = torch.randint(1, 2**bits, (groups, out_features), generator=generator)
            g_idx = (torch.arange(in_features) // (in_features if group_size == -1 else group_size)).to(torch.int32)
            if desc_act:
                g_idx = g_idx[torch.randperm(in_features, generator=generator)]
            tensors[f"{prefix}.qweight"] = pack_qweight(intweight, bits).numpy()
            tensors[f"{prefix}.qzeros"] = pack_qzeros(zeros, bits).numpy()
            tensors[f"{prefix}.scales"] = (torch.rand(groups, out_features, generator=generator) / 100).half().numpy()
            tensors[f"{prefix}.g_idx"] = g_idx.numpy()
            tensors[f"{prefix}.bias"] = np.zeros(out_features, dtype=np.float16)
    tensors["model.decoder.embed_tokens.weight"] = np.zeros((128, hidden), dtype=np.float16)
    write_safetensors(folder / f"gptq_model-{bits}bit-{group_size}g.safetensors", tensors, {"format": "pt"})
    qconfig = {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": True, "damp_percent": 0.01,
               "static_groups": False, "true_sequential": True, "quant_method": "gptq", "checkpoint_format": "gptq",
               "model_file_base_name": f"gptq_model-{bits}bit-{group_size}g"}
    (folder / "quantize_config.json").write_text(json.dumps(qconfig))
    (folder / "config.json").write_text(json.dumps({"model_type": "opt", "num_hidden_layers": layers,
                                                    "hidden_size": hidden, "quantization_config": qconfig}))
    return folder


def leftovers(folder: Path) -> list[Path]:
    """Temporaries and partial files under ``folder`` that a finished run must not leave behind."""
    markers = (".gptq-tools-tmp-", ".incomplete", ".partial")
    return sorted(p for p in folder.rglob("*") if any(marker in p.name for marker in markers))


def kill_at_each_step(setup, args, state, *, base: Path, cwd: Path | None = None,
                      env: dict[str, str] | None = None, timeout: float = 300) -> list[str]:
    """Prove that a rerun repairs a run killed right after each of its publishing steps.

    ``setup(root)`` builds fresh inputs under ``root``; ``args(root)`` gives the CLI arguments;
    ``state(root)`` returns what must be equal after a clean run and after kill + rerun (e.g. file
    hashes). A clean run records its steps (``GPTQ_TOOLS_STEP_LOG``); then for each step N a fresh copy
    is run with ``GPTQ_TOOLS_KILL_AT_STEP=N`` (it must die by SIGKILL), rerun without the kill (it must
    exit 0) and compared with the clean run; no temporary may be left. Returns the recorded steps
    (``KIND PATH``), so a test can also assert which steps exist.
    """
    extra = dict(env or {})

    def run(root: Path, more: dict[str, str]) -> subprocess.CompletedProcess[str]:
        full = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GPTQ_TOOLS_DISABLE_PROGRESS": "1", **extra, **more}
        return subprocess.run([sys.executable, "-m", "gptq_tools", *args(root)], capture_output=True, text=True,
                              cwd=cwd or root, env=full, timeout=timeout, check=False)

    clean = base / "clean"
    clean.mkdir(parents=True)
    setup(clean)
    log = base / "steps.log"
    result = run(clean, {"GPTQ_TOOLS_STEP_LOG": str(log)})
    assert result.returncode == 0, result.stderr
    expected = state(clean)
    steps = log.read_text().splitlines() if log.exists() else []
    assert steps, "the command recorded no publishing step"
    for number in range(1, len(steps) + 1):
        root = base / f"kill-{number}"
        root.mkdir()
        setup(root)
        killed = run(root, {"GPTQ_TOOLS_KILL_AT_STEP": str(number)})
        step = steps[number - 1]
        assert killed.returncode == -9, f"step {number} ({step}): exit {killed.returncode}\n{killed.stderr}"
        rerun = run(root, {})
        assert rerun.returncode == 0, f"rerun after kill at step {number} ({step}):\n{rerun.stderr}"
        assert state(root) == expected, f"after kill at step {number} ({step})"
        assert leftovers(root) == [], f"after kill at step {number} ({step})"
    return steps
