"""Distributed quantization benchmark: 1 rank vs 2 ranks on this machine (gloo, one thread each).

For the tiny OPT, BLOOM and LLaMA models of ``scripts/bench_quant.py`` (trained here, 800 steps), quantizes
with 4 and 3 bits, group 32, act-order and the default method (fp-target), the same 64 calibration windows,
once in one process and once with ``torchrun --nproc-per-node 2`` (``torch.distributed.run``), and prints:
wall time of each, the speed-up, the fraction of rank 0's time spent in collectives (waiting for the other
rank included), the KL divergence from the fp16 model of both checkpoints with their ratio (goal: within
1.01x), and whether the two checkpoints hold the same tensors bit for bit.

Usage: python scripts/bench_quant_dist.py [--out bench-out/quant-dist] [--nsamples 64] [--arch opt bloom llama]
       [--bits 4 3] [--method fp-target|gptq] [--steps 800] [--synthetic HIDDEN LAYERS]
Writes OUT/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from gptq_tools.quant.config import QuantizeConfig  # noqa: E402

DEFAULT_METHOD = QuantizeConfig().method

CHILD = """
import json, sys, torch
from gptq_tools.quant.config import QuantizeConfig
from gptq_tools.quant.driver import quantize_model
model, out, calib, nsamples, seqlen = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
bits, method = int(sys.argv[6]), sys.argv[7]
config = QuantizeConfig(bits=bits, group_size=32, desc_act=True, method=method)
summary = quantize_model(model, out, calibration=calib, nsamples=nsamples, seqlen=seqlen, config=config,
                         single_file=True)
print("RESULT " + json.dumps({"rank": summary.rank, "seconds": summary.seconds, "comm_seconds": summary.comm_seconds}))
"""


def _run(world: int, model: Path, out: Path, calib: Path, nsamples: int, seqlen: int, bits: int = 4,
         method: str = DEFAULT_METHOD) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTQ_TOOLS_DISABLE_PROGRESS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    script = out.parent / "bench_dist_child.py"
    script.write_text(CHILD)
    args = [str(model), str(out), str(calib), str(nsamples), str(seqlen), str(bits), method]
    if world == 1:
        argv = [sys.executable, str(script), *args]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                str(script), *args]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{world} rank(s) failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    main = next(r for r in ranks if r["rank"] == 0)
    return {"world": world, "wall_seconds": wall, "seconds": main["seconds"], "comm_seconds": main["comm_seconds"],
            "ranks": ranks}


def _trained_model(arch: str, root: Path, steps: int) -> Path:
    """``make bench-quant``'s tiny model (``--steps 800``, its setting) or a shorter-trained one, both named as
    ``scripts/bench_quant.py`` names them."""
    import bench_quant
    from bench_quant import BENCH_SPEC

    return bench_quant._model(arch, root, replace(BENCH_SPEC, steps=steps))


def _same_tensors(first: Path, second: Path) -> bool:
    """Whether two single-file checkpoints hold the same tensors, bit for bit."""
    import torch
    from safetensors.torch import load_file

    ours, theirs = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    return sorted(ours) == sorted(theirs) and all(torch.equal(ours[name], theirs[name]) for name in ours)


def bench_arch(arch: str, root: Path, *, bits: int, method: str, nsamples: int, steps: int) -> dict:
    from bench_quant import SEQLEN, evaluation_setup

    model = _trained_model(arch, root, steps)
    calib = root / f"calib-{arch}.safetensors"
    quality = evaluation_setup(model, calib, nsamples=nsamples)
    rows = {}
    for world in (1, 2):
        out = root / f"out-{arch}-{bits}bit-{world}"
        rows[world] = _run(world, model, out, calib, nsamples, SEQLEN, bits, method)
        rows[world].update(quality(out))
        print(arch, bits, rows[world], flush=True)
    one, two = rows[1], rows[2]
    identical = _same_tensors(root / f"out-{arch}-{bits}bit-1", root / f"out-{arch}-{bits}bit-2")
    return {"arch": arch, "bits": bits, "method": method, "one": one, "two": two,
            "speedup": one["seconds"] / two["seconds"], "comm_fraction": two["comm_seconds"] / two["seconds"],
            "kl_ratio": two["kl"] / one["kl"], "identical": identical}


def bench_synthetic(root: Path, *, hidden: int, layers: int, nsamples: int) -> dict:
    """1 vs 2 ranks on a random-weight OPT of ``hidden`` x ``layers`` (``scripts/bench_quant_memory.py``'s
    builder): timing only, since a random model's KL says nothing."""
    from bench_quant_memory import build_model

    model = build_model(root / f"synthetic-{hidden}x{layers}", layers=layers, hidden=hidden, nsamples=nsamples)
    rows = {}
    for world in (1, 2):
        rows[world] = _run(world, model, root / f"out-synthetic-{world}", model / "calib.safetensors", nsamples, 128)
        print(f"synthetic {hidden}x{layers}", rows[world], flush=True)
    one, two = rows[1], rows[2]
    return {"arch": f"opt {hidden}x{layers} (random)", "bits": 4, "one": one, "two": two,
            "speedup": one["seconds"] / two["seconds"], "comm_fraction": two["comm_seconds"] / two["seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-out" / "quant-dist")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--arch", nargs="*", default=["opt", "bloom", "llama"],
                        help="trained tiny models (none: --arch alone)")
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=["fp-target", "gptq"],
                        help=f"quantization method (default: QuantizeConfig's, {DEFAULT_METHOD})")
    parser.add_argument("--steps", type=int, default=800, help="training steps of the tiny models (800: make "
                        "bench-quant's models)")
    parser.add_argument("--synthetic", nargs=2, type=int, metavar=("HIDDEN", "LAYERS"),
                        help="also time a random-weight OPT of this width and depth (e.g. 1024 8), where the work "
                        "per layer is large enough for the ranks to matter")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    results = [bench_arch(arch, args.out, bits=bits, method=args.method, nsamples=args.nsamples, steps=args.steps)
               for bits in args.bits for arch in args.arch]
    if args.synthetic:
        results.append(bench_synthetic(args.out, hidden=args.synthetic[0], layers=args.synthetic[1],
                                       nsamples=args.nsamples))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{'model':>6}  {'bits':>4}  {'1 rank s':>9}  {'2 ranks s':>9}  {'speed-up':>8}  {'comm':>6}  "
          f"{'KL 1 rank':>10}  {'KL 2 ranks':>10}  {'KL ratio':>8}  {'same bits':>9}")
    for r in results:
        quality = (f"  {r['one']['kl']:10.3e}  {r['two']['kl']:10.3e}  {r['kl_ratio']:7.4f}x  "
                   f"{'yes' if r['identical'] else 'no':>9}" if "kl_ratio" in r else "  (random weights: timing only)")
        print(f"{r['arch']:>6}  {r['bits']:>4}  {r['one']['seconds']:9.1f}  {r['two']['seconds']:9.1f}  "
              f"{r['speedup']:7.2f}x  {r['comm_fraction']:6.1%}{quality}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
