"""Benchmark ``load_quantized``: load time and peak host memory on a synthetic 2-4 GB GPTQ checkpoint.

Writes an OPT-shaped 4-bit checkpoint (hidden 4096, 24 layers: about 2.8 GB) once into
``bench-out/load/``, then in the same run:

1. where the page cache may be dropped (root), times ``cat <files> > /dev/null`` and the load each
   from a cold cache; then, warm, times ``cat`` before and after the load and keeps the faster;
2. loads the checkpoint in a fresh process (under ``/usr/bin/time -v`` when present), which reports the
   load time and its peak RSS (``resource``), and the bytes of weights it placed on the CPU.

Checks: peak RSS minus the CPU-placed weight bytes stays under 2 GiB plus the largest tensor, and the
load time is within 1.5x of reading the files once. Prints one JSON line with all numbers; exit status
1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

GiB = 1024**3
CONFIG = {"model_type": "opt", "hidden_size": 4096, "num_hidden_layers": 24, "ffn_dim": 16384,
          "num_attention_heads": 32, "vocab_size": 50272, "max_position_embeddings": 2048,
          "word_embed_proj_dim": 4096, "torch_dtype": "float16", "tie_word_embeddings": True}
QUANTIZE = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "quant_method": "gptq",
            "checkpoint_format": "gptq"}


def write_checkpoint(folder: Path) -> Path:
    """The synthetic checkpoint (written once; reused when complete)."""
    import torch

    from gptq_tools.checkpoint.model_files import QuantizeSettings
    from gptq_tools.files.fileio import atomic_output
    from gptq_tools.files.safetensors_format import build_header
    from gptq_tools.runtime.plan import build_meta_model, config_from_dict, tied_names

    weights = folder / "gptq_model-4bit-128g.safetensors"
    if weights.is_file():
        return weights
    folder.mkdir(parents=True, exist_ok=True)
    config = config_from_dict(CONFIG)
    model, _, _ = build_meta_model(config, QuantizeSettings(bits=4, group_size=128))
    followers = tied_names(model)
    tensors = [(n, t) for n, t in model.state_dict(keep_vars=True).items() if n not in followers]
    dtype_names = {torch.float16: "F16", torch.int32: "I32"}
    header, _ = build_header([(n, dtype_names[t.dtype], tuple(t.shape)) for n, t in tensors],
                             metadata={"format": "pt"})
    generator = torch.Generator().manual_seed(0)
    with atomic_output(weights, force=True) as handle:
        handle.write(header)
        for name, meta in tensors:
            handle.write(synthetic_tensor(name, meta, generator).numpy().tobytes())
    config.quantization_config = QUANTIZE
    config.save_pretrained(folder)
    (folder / "quantize_config.json").write_text(json.dumps(QUANTIZE), encoding="utf-8")
    return weights


def synthetic_tensor(name: str, meta, generator):  # torch types: torch is imported late
    import torch

    shape = tuple(meta.shape)
    if name.endswith(".qweight"):  # random words; a tiled 4 MiB block keeps writing fast
        block = torch.randint(-2**31, 2**31 - 1, (1 << 20,), dtype=torch.int32, generator=generator)
        count = math.prod(shape)
        return block.repeat(count // block.numel() + 1)[:count].reshape(shape)
    if name.endswith(".qzeros"):
        return torch.full(shape, 0x77777777, dtype=torch.int32)  # zero 8 stored as 7 (v1, symmetric)
    if name.endswith(".g_idx"):
        return (torch.arange(shape[0]) // 128).to(torch.int32)
    if name.endswith(".scales"):
        return torch.full(shape, 0.002, dtype=torch.float16)
    if name.endswith("layer_norm.weight"):
        return torch.ones(shape, dtype=torch.float16)
    block = (torch.randn(1 << 20, generator=generator) * 0.02).to(torch.float16)
    count = math.prod(shape)
    return block.repeat(count // block.numel() + 1)[:count].reshape(shape)


def child(folder: str) -> None:
    """Load in this process and print the numbers as JSON (run in a fresh interpreter)."""
    import torch

    from gptq_tools.checkpoint.model_files import find_checkpoint_files
    from gptq_tools.runtime.load import load_quantized
    from gptq_tools.runtime.qlinear import QuantLinear

    started = time.perf_counter()
    from transformers import OPTForCausalLM  # noqa: F401 - import the model code before timing the load

    import_seconds = time.perf_counter() - started
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    model = load_quantized(folder, max_memory={"cpu": "16GiB"}, verify_hash=False, kernel="torch")  # keeps qweight
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values() if t.device.type == "cpu"}
    cpu_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    largest = max(e.nbytes for e in find_checkpoint_files(folder).entries.values())
    first = next(m for m in model.modules() if isinstance(m, QuantLinear))
    finite = bool(torch.isfinite(first.dequantized_columns(0, 64, torch.float32)).all())
    print(json.dumps({"load_seconds": seconds, "model_code_import_seconds": import_seconds,
                      "peak_rss": peak, "rss_after_imports": baseline,
                      "cpu_weight_bytes": cpu_bytes, "largest_tensor": largest,
                      "weights_finite": finite}))


def time_cat(path: Path) -> float:
    """Seconds for ``cat path > /dev/null``."""
    started = time.perf_counter()
    subprocess.run(["sh", "-c", 'cat "$0" > /dev/null', str(path)], check=True)
    return time.perf_counter() - started


def drop_caches() -> bool:
    """Empty the page cache (root only) so the next read comes from disk; False when not allowed."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def load_in_child(folder: Path) -> tuple[dict, str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder)]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GPTQ_TOOLS_DISABLE_PROGRESS": "1"}
    result = subprocess.run(timer + command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(REPO_ROOT / "bench-out" / "load"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    folder = Path(args.folder)
    weights = write_checkpoint(folder)
    size = weights.stat().st_size
    cold: dict[str, float] = {}
    if drop_caches():  # cold: both read from disk, which is what a first load of a big model does
        cold["cat_seconds"] = round(time_cat(weights), 3)
        drop_caches()
        cold["load_seconds"] = round(load_in_child(folder)[0]["load_seconds"], 3)
        cold["load_to_cat_ratio"] = round(cold["load_seconds"] / cold["cat_seconds"], 3)
    cat_seconds = time_cat(weights)
    numbers, stderr = load_in_child(folder)
    # the fairer warm baseline: the faster of reading the file before the load and after it
    cat_seconds = min(cat_seconds, time_cat(weights))
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    time_v_rss = int(match.group(1)) * 1024 if match else None
    bound = 2 * GiB + numbers["largest_tensor"]
    over_weights = numbers["peak_rss"] - numbers["cpu_weight_bytes"]
    report = {"file_bytes": size, "cat_seconds": round(cat_seconds, 3), **numbers,
              "time_v_peak_rss": time_v_rss, "rss_minus_cpu_weights": over_weights, "rss_bound": bound,
              "rss_ratio_to_bound": round(over_weights / bound, 3),
              "load_to_cat_ratio": round(numbers["load_seconds"] / cat_seconds, 3),
              "read_gib_per_s": round(size / GiB / numbers["load_seconds"], 3)}
    if cold:
        report["cold"] = cold
    worst_ratio = max(report["load_to_cat_ratio"], cold.get("load_to_cat_ratio", 0.0))
    report["ok"] = over_weights < bound and worst_ratio <= 1.5 and numbers["weights_finite"]
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
