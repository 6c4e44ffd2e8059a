"""Quantizer memory versus depth: peak anonymous memory of 8- and 32-layer models of one shape, and a
run under a memory cgroup capped below the model's fp16 size.

1. Builds synthetic OPT models (random fp16 weights, tokenized calibration) of 8 and 32 layers and
   quantizes each in a child process while the parent samples the child's resident anonymous memory
   (``/proc/PID/smaps_rollup``) every 20 ms. Prints both peaks and their ratio (the goal: within 10%),
   and the same with the allocator release switched off (``--compare-no-release``), which is how the
   depth-dependent growth looked before.
2. With ``--cgroup`` (root, cgroup v1 ``/sys/fs/cgroup/memory`` or v2 ``/sys/fs/cgroup``): a deep,
   narrow model (a few hundred small layers) is quantized once uncapped and once inside a fresh memory
   cgroup whose limit is below the model's fp16 size; the two checkpoints must be byte-identical.

Usage: python scripts/bench_quant_memory.py [--out bench-out/quant-memory] [--hidden 512] [--compare-no-release]
       [--cgroup] [--deep-layers 400 --deep-hidden 256 --cap 560MiB]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

MiB = 1024**2
CHILD = """
import sys, torch
torch.set_num_threads(1)
from gptq_tools.quant import driver
from gptq_tools.quant.config import QuantizeConfig
if sys.argv[4] == "no-release":
    driver.release_free_memory = lambda: False
driver.quantize_model(sys.argv[1], sys.argv[2], calibration=sys.argv[1] + "/calib.safetensors",
                      config=QuantizeConfig(group_size=128), nsamples=int(sys.argv[3]), seqlen=128,
                      single_file=True)
"""


def build_model(folder: Path, *, layers: int, hidden: int, vocab: int = 2048, nsamples: int = 16) -> Path:
    """A synthetic OPT (random fp16 weights written tensor by tensor) plus tokenized calibration."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from gptq_tools.files.fileio import atomic_output
    from gptq_tools.files.safetensors_format import build_header

    if (folder / "calib.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": hidden,
              "num_hidden_layers": layers, "ffn_dim": 4 * hidden, "num_attention_heads": max(1, hidden // 64),
              "vocab_size": vocab, "max_position_embeddings": 2048, "word_embed_proj_dim": hidden,
              "do_layer_norm_before": True, "torch_dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float16)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items() if name != "lm_head.weight"}
    header, _ = build_header([(name, "F16", shape) for name, shape in shapes.items()], metadata={"format": "pt"})
    generator = torch.Generator().manual_seed(0)
    with atomic_output(folder / "model.safetensors", force=True) as handle:
        handle.write(header)
        for name, shape in shapes.items():
            if "layer_norm" in name and name.endswith("weight"):
                tensor = torch.ones(shape)
            elif name.endswith("bias"):
                tensor = torch.zeros(shape)
            else:
                tensor = torch.randn(shape, generator=generator) * 0.02
            handle.write(tensor.to(torch.float16).numpy().tobytes())
    save_file({"input_ids": torch.randint(0, vocab, (nsamples, 128), generator=generator)},
              str(folder / "calib.safetensors"))
    return folder


def fp16_bytes(folder: Path) -> int:
    return (folder / "model.safetensors").stat().st_size


def run_sampled(model: Path, out: Path, *, nsamples: int, mode: str = "release",
                prefix: tuple[str, ...] = ()) -> dict[str, float]:
    """Quantize in a child process; sample its anonymous memory every 20 ms."""
    from gptq_tools.quant.memory import anonymous_bytes

    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "GPTQ_TOOLS_DISABLE_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    child = subprocess.Popen([*prefix, sys.executable, "-c", CHILD, str(model), str(out), str(nsamples), mode],
                             cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        sample = anonymous_bytes(child.pid)
        peak = max(peak, sample or 0)
        time.sleep(0.02)
    stderr = child.stderr.read() if child.stderr else ""
    return {"rc": child.returncode, "peak_anon": peak, "seconds": time.perf_counter() - started,
            "stderr_tail": stderr[-2000:]}


def depth_table(root: Path, *, hidden: int, nsamples: int, compare: bool) -> list[dict]:
    rows = []
    modes = ("release", "no-release") if compare else ("release",)
    for mode in modes:
        for layers in (8, 32):
            model = build_model(root / f"opt-{hidden}x{layers}", layers=layers, hidden=hidden, nsamples=nsamples)
            result = run_sampled(model, root / f"out-{hidden}x{layers}-{mode}", nsamples=nsamples, mode=mode)
            if result["rc"] != 0:
                raise SystemExit(f"quantize failed ({layers} layers, {mode}):\n{result['stderr_tail']}")
            rows.append({"mode": mode, "layers": layers, "fp16_bytes": fp16_bytes(model), **result})
            print(f"{mode:>10}  {layers:3d} layers  fp16 {fp16_bytes(model) / MiB:8.1f} MiB  peak anonymous "
                  f"{result['peak_anon'] / MiB:8.1f} MiB  {result['seconds']:6.1f} s", flush=True)
    return rows


class MemoryCgroup:
    """A fresh memory cgroup (v1 or v2) with a hard limit; removed on exit."""

    def __init__(self, limit: int) -> None:
        v1 = Path("/sys/fs/cgroup/memory")
        v2 = Path("/sys/fs/cgroup")
        if (v1 / "memory.limit_in_bytes").exists():
            self.path, self.limit_file, self.peak_file = v1 / f"gptq-bench-{os.getpid()}", "memory.limit_in_bytes", \
                "memory.max_usage_in_bytes"
        elif (v2 / "cgroup.controllers").exists() and "memory" in (v2 / "cgroup.controllers").read_text():
            self.path, self.limit_file, self.peak_file = v2 / f"gptq-bench-{os.getpid()}", "memory.max", "memory.peak"
        else:
            raise SystemExit("no memory cgroup controller here; run without --cgroup")
        self.limit = limit

    def __enter__(self) -> MemoryCgroup:
        self.path.mkdir()
        (self.path / self.limit_file).write_text(str(self.limit))
        return self

    def prefix(self) -> tuple[str, ...]:
        """A command prefix that moves the child into the cgroup before Python starts."""
        return ("sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh")

    def peak(self) -> int | None:
        try:
            return int((self.path / self.peak_file).read_text())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc: object) -> None:
        self.path.rmdir()


def cgroup_run(root: Path, *, layers: int, hidden: int, cap: int) -> dict:
    model = build_model(root / f"deep-{hidden}x{layers}", layers=layers, hidden=hidden, nsamples=4)
    size = fp16_bytes(model)
    if cap >= size:
        raise SystemExit(f"the cap {cap / MiB:.0f} MiB is not below the model's fp16 size {size / MiB:.0f} MiB")
    free = run_sampled(model, root / "deep-uncapped", nsamples=4)
    with MemoryCgroup(cap) as group:
        capped = run_sampled(model, root / "deep-capped", nsamples=4, prefix=group.prefix())
        group_peak = group.peak()
    same = capped["rc"] == 0 and free["rc"] == 0 and not filecmp.dircmp(root / "deep-uncapped",
                                                                         root / "deep-capped").diff_files
    if same:
        names = sorted(p.name for p in (root / "deep-uncapped").iterdir())
        same = names == sorted(p.name for p in (root / "deep-capped").iterdir()) and all(
            (root / "deep-uncapped" / n).read_bytes() == (root / "deep-capped" / n).read_bytes() for n in names)
    result = {"layers": layers, "hidden": hidden, "fp16_bytes": size, "cap_bytes": cap, "uncapped": free,
              "capped": capped, "cgroup_peak_bytes": group_peak, "byte_identical": same}
    print(f"deep model {layers} layers x hidden {hidden}: fp16 {size / MiB:.1f} MiB, cgroup cap {cap / MiB:.0f} MiB"
          f"\n  uncapped: peak anonymous {free['peak_anon'] / MiB:.1f} MiB, {free['seconds']:.1f} s"
          f"\n  capped:   exit {capped['rc']}, peak anonymous {capped['peak_anon'] / MiB:.1f} MiB, cgroup peak "
          f"{(group_peak or 0) / MiB:.1f} MiB (page cache included), {capped['seconds']:.1f} s"
          f"\n  checkpoints byte-identical: {same}", flush=True)
    if capped["rc"] != 0:
        print(capped["stderr_tail"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-out" / "quant-memory")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--compare-no-release", action="store_true",
                        help="also run with the allocator release switched off (the old behaviour)")
    parser.add_argument("--cgroup", action="store_true", help="also run the capped deep model (root)")
    parser.add_argument("--no-depth", action="store_true", help="skip the 8 vs 32 layer comparison")
    parser.add_argument("--deep-layers", type=int, default=400)
    parser.add_argument("--deep-hidden", type=int, default=256)
    parser.add_argument("--cap", default="560MiB", help="cgroup memory limit for the deep model")
    args = parser.parse_args()
    from gptq_tools.units import parse_size

    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"depth": [] if args.no_depth else depth_table(args.out, hidden=args.hidden,
                                                                    nsamples=args.nsamples,
                                                                    compare=args.compare_no_release)}
    for mode in ("release", "no-release"):
        rows = {row["layers"]: row["peak_anon"] for row in results["depth"] if row["mode"] == mode}
        if len(rows) == 2:
            print(f"{mode}: peak anonymous 32 layers / 8 layers = {rows[32] / rows[8]:.3f}x")
    if args.cgroup:
        results["cgroup"] = cgroup_run(args.out, layers=args.deep_layers, hidden=args.deep_hidden,
                                       cap=parse_size(args.cap))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
