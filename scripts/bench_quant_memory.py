"""Quantizer memory versus depth: peak anonymous memory of a shallow and a deep model of one shape, and a
run under a memory cgroup capped below the model's fp16 size.

1. Builds synthetic OPT models (random fp16 weights, tokenized calibration) and quantizes each in a child
   process while the parent samples the child's resident anonymous memory (``/proc/PID/smaps_rollup``)
   every ``--interval`` seconds (20 ms). Two cases: ``small`` (hidden 512, 8 vs 32 layers, seqlen 128) and
   ``wide`` (hidden 1024, ffn 4096, 8 vs 64 layers, seqlen 256; issue 22). Prints each peak, the ratio
   deep/shallow (the goal: within 1.10x), the MiB per added layer, the peak a 0.1 s sampler would have
   seen, the child's ``VmHWM`` (the kernel's exact high-water mark of anonymous plus file-backed resident
   memory) and the spread of the resident anonymous memory left after each layer. ``--modes`` adds the
   earlier allocator settings for comparison: ``trim-only`` (``malloc_trim`` after each layer but glibc's
   dynamic mmap threshold, as before issue 22) and ``no-release`` (neither, as before the trim).
2. With ``--cgroup`` (root, cgroup v1 ``/sys/fs/cgroup/memory`` or v2 ``/sys/fs/cgroup``): a deep,
   narrow model (a few hundred small layers) is quantized once uncapped and once inside a fresh memory
   cgroup whose limit is below the model's fp16 size; the two checkpoints must be byte-identical.

Usage: python scripts/bench_quant_memory.py [--out bench-out/quant-memory] [--cases small,wide]
       [--modes fixed,trim-only,no-release] [--interval 0.02] [--cgroup] [--deep-layers 400 --deep-hidden 256
       --cap 560MiB]
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
import json, sys, torch
torch.set_num_threads(1)
from gptq_tools.quant import driver
from gptq_tools.quant.config import QuantizeConfig
from gptq_tools.quant.memory import anonymous_bytes
model, out, nsamples, seqlen, mode = sys.argv[1:6]
if mode in ("trim-only", "no-release"):
    driver.map_large_blocks = lambda: False
if mode == "no-release":
    driver.release_free_memory = lambda: False
after_layer = []
driver.quantize_model(model, out, calibration=model + "/calib.safetensors", config=QuantizeConfig(group_size=128),
                      nsamples=int(nsamples), seqlen=int(seqlen), single_file=True,
                      on_layer_done=lambda index: after_layer.append(anonymous_bytes()))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kib = {key: int(status[key].split()[0]) * 1024 for key in ("VmHWM", "RssAnon", "RssFile")}
print(json.dumps({"after_layer": after_layer, **kib}))
"""

#: name: (hidden, ffn, (shallow layers, deep layers), seqlen)
CASES = {"small": (512, 2048, (8, 32), 128), "wide": (1024, 4096, (8, 64), 256)}
MODES = ("fixed", "trim-only", "no-release")
COARSE_INTERVAL = 0.1  # how issue 22 sampled


def build_model(folder: Path, *, layers: int, hidden: int, ffn: int | None = None, vocab: int = 2048,
                nsamples: int = 16, seqlen: int = 128) -> Path:
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
              "num_hidden_layers": layers, "ffn_dim": ffn or 4 * hidden, "num_attention_heads": max(1, hidden // 64),
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
    save_file({"input_ids": torch.randint(0, vocab, (nsamples, seqlen), generator=generator)},
              str(folder / "calib.safetensors"))
    return folder


def fp16_bytes(folder: Path) -> int:
    return (folder / "model.safetensors").stat().st_size


def run_sampled(model: Path, out: Path, *, nsamples: int, seqlen: int = 128, mode: str = "fixed",
                interval: float = 0.02, prefix: tuple[str, ...] = ()) -> dict:
    """Quantize in a child process; sample its anonymous memory every ``interval`` seconds."""
    from gptq_tools.quant.memory import anonymous_bytes

    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "GPTQ_TOOLS_DISABLE_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    child = subprocess.Popen([*prefix, sys.executable, "-c", CHILD, str(model), str(out), str(nsamples),
                              str(seqlen), mode], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, int]] = []
    while child.poll() is None:
        sample = anonymous_bytes(child.pid)
        if sample is not None:
            samples.append((time.perf_counter() - started, sample))
        time.sleep(interval)
    stdout, stderr = child.communicate()
    report = json.loads(stdout.strip().splitlines()[-1]) if child.returncode == 0 else {}
    return {"rc": child.returncode, "peak_anon": max((s for _, s in samples), default=0),
            "peak_anon_coarse": coarse_peak(samples, COARSE_INTERVAL), "seconds": time.perf_counter() - started,
            "interval": interval, "samples": len(samples), **report, "stderr_tail": stderr[-2000:]}


def coarse_peak(samples: list[tuple[float, int]], interval: float) -> int:
    """The peak a sampler reading every ``interval`` seconds would have seen (the first sample per tick)."""
    seen: dict[int, int] = {}
    for at, value in samples:
        seen.setdefault(int(at / interval), value)
    return max(seen.values(), default=0)


def depth_table(root: Path, *, case: str, nsamples: int, modes: tuple[str, ...], interval: float) -> list[dict]:
    hidden, ffn, depths, seqlen = CASES[case]
    rows = []
    for mode in modes:
        for layers in depths:
            model = build_model(root / f"opt-{hidden}x{layers}" if case == "small" else
                                root / f"opt-{hidden}-{ffn}x{layers}-s{seqlen}",
                                layers=layers, hidden=hidden, ffn=ffn, nsamples=nsamples, seqlen=seqlen)
            result = run_sampled(model, root / f"out-{case}-{layers}-{mode}", nsamples=nsamples, seqlen=seqlen,
                                 mode=mode, interval=interval)
            if result["rc"] != 0:
                raise SystemExit(f"quantize failed ({case}, {layers} layers, {mode}):\n{result['stderr_tail']}")
            after = [value / MiB for value in result["after_layer"]]
            rows.append({"case": case, "mode": mode, "layers": layers, "hidden": hidden, "ffn": ffn,
                         "seqlen": seqlen, "fp16_bytes": fp16_bytes(model), **result})
            print(f"{case:>5} {mode:>10}  {layers:3d} layers  fp16 {fp16_bytes(model) / MiB:7.1f} MiB  peak anonymous "
                  f"{result['peak_anon'] / MiB:6.1f} MiB (every {COARSE_INTERVAL:g} s: "
                  f"{result['peak_anon_coarse'] / MiB:6.1f})  VmHWM {result['VmHWM'] / MiB:6.1f} MiB  after each "
                  f"layer {min(after):.1f}-{max(after):.1f} MiB  {result['seconds']:6.1f} s", flush=True)
    return rows


def depth_summary(rows: list[dict]) -> list[dict]:
    """Per case and mode: deep/shallow peak ratios and MiB per added layer."""
    summary = []
    for case, mode in dict.fromkeys((row["case"], row["mode"]) for row in rows):
        pair = sorted((row for row in rows if row["case"] == case and row["mode"] == mode), key=lambda r: r["layers"])
        if len(pair) != 2:
            continue
        shallow, deep = pair
        added = deep["layers"] - shallow["layers"]
        entry = {"case": case, "mode": mode, "layers": (shallow["layers"], deep["layers"])}
        for key in ("peak_anon", "peak_anon_coarse", "VmHWM"):
            entry[key] = (shallow[key], deep[key], deep[key] / shallow[key], (deep[key] - shallow[key]) / MiB / added)
        summary.append(entry)
        ratio, slope = entry["peak_anon"][2:]
        print(f"{case} {mode}: peak anonymous {deep['layers']} / {shallow['layers']} layers = {ratio:.3f}x "
              f"({slope:+.2f} MiB per added layer; every {COARSE_INTERVAL:g} s {entry['peak_anon_coarse'][2]:.3f}x, "
              f"VmHWM {entry['VmHWM'][2]:.3f}x {entry['VmHWM'][3]:+.2f} MiB/layer) "
              f"[{'ok' if ratio <= 1.10 else 'over'} the 1.10x goal]", flush=True)
    return summary


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
    parser.add_argument("--cases", default="small,wide", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--modes", default="fixed", help=f"comma-separated allocator settings, of {', '.join(MODES)}")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--interval", type=float, default=0.02, help="sampling interval, seconds")
    parser.add_argument("--compare-no-release", action="store_true", help="same as adding no-release to --modes")
    parser.add_argument("--cgroup", action="store_true", help="also run the capped deep model (root)")
    parser.add_argument("--no-depth", action="store_true", help="skip the depth comparison")
    parser.add_argument("--deep-layers", type=int, default=400)
    parser.add_argument("--deep-hidden", type=int, default=256)
    parser.add_argument("--cap", default="560MiB", help="cgroup memory limit for the deep model")
    args = parser.parse_args()
    from gptq_tools.units import parse_size

    cases = tuple(name for name in args.cases.split(",") if name)
    modes = tuple(dict.fromkeys([*(m for m in args.modes.split(",") if m)] +
                                (["no-release"] if args.compare_no_release else [])))
    unknown = [name for name in cases if name not in CASES] + [name for name in modes if name not in MODES]
    if unknown:
        parser.error(f"unknown case or mode: {', '.join(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [] if args.no_depth else [row for case in cases for row in depth_table(
        args.out, case=case, nsamples=args.nsamples, modes=modes, interval=args.interval)]
    results: dict = {"depth": rows, "summary": depth_summary(rows)}
    if args.cgroup:
        results["cgroup"] = cgroup_run(args.out, layers=args.deep_layers, hidden=args.deep_hidden,
                                       cap=parse_size(args.cap))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
