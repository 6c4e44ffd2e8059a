"""Quantization time of the default method (fp-target) against plain GPTQ, in alternating repeated runs.

``make bench-quant`` times each method once, next to everything else it runs; on the tiny models a run takes
2-5 s, so one busy second on a shared machine moves a ratio by 0.3. This script times only the two methods
the issue's time goal compares, on ``scripts/bench_quant.py``'s models and calibration windows, alternating
which runs first in each round, and reports the median seconds of each and the median of the per-round
ratios (goal: at most 2x). The checkpoints are the same bits in every round, so quality is not measured again.

Usage: python scripts/bench_quant_time.py [--out bench-out/quant] [--repeats 3] [--arch opt llama bloom]
       [--cases BITS:GROUP,...] [--steps 800] [--nsamples 64]
Writes OUT/time.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import bench_quant  # noqa: E402
from bench_quant import ARCHS, BENCH_SPEC, BITS, GROUPS  # noqa: E402

from gptq_tools.quant.config import QuantizeConfig  # noqa: E402

METHODS = ("gptq", "fp-target")


def time_case(model: Path, calib: Path, out: Path, *, bits: int, group_size: int, nsamples: int,
              repeats: int) -> dict:
    """``repeats`` rounds of both methods (the order alternating round by round); seconds per run."""
    seconds: dict[str, list[float]] = {method: [] for method in METHODS}
    for round_index in range(repeats):
        order = METHODS if round_index % 2 == 0 else METHODS[::-1]
        for method in order:
            config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=True, static_groups=True,
                                    method=method)
            seconds[method].append(bench_quant._ours(model, out, calib, config, nsamples))
    ratios = [fp / plain for fp, plain in zip(seconds["fp-target"], seconds["gptq"])]
    return {"bits": bits, "group_size": group_size, "seconds": seconds,
            "median": {method: statistics.median(values) for method, values in seconds.items()},
            "ratio": statistics.median(ratios)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-out" / "quant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arch", nargs="+", default=list(ARCHS))
    parser.add_argument("--cases", help="BITS:GROUP[,BITS:GROUP...] (default: all of bench-quant's)")
    parser.add_argument("--steps", type=int, default=BENCH_SPEC.steps)
    parser.add_argument("--nsamples", type=int, default=64)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    warnings.filterwarnings("ignore")
    cases = bench_quant.parse_cases(parser, args.cases) if args.cases else \
        tuple((bits, group) for bits in BITS for group in GROUPS)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = replace(BENCH_SPEC, steps=args.steps)
    results = []
    for arch in args.arch:
        model = bench_quant._model(arch, args.out, spec)
        calib = args.out / f"calib-{arch}.safetensors"
        if not calib.is_file():
            bench_quant.evaluation_setup(model, calib, nsamples=args.nsamples)
        for bits, group_size in cases:
            row = {"arch": arch, **time_case(model, calib, args.out / f"time-{arch}", bits=bits,
                                             group_size=group_size, nsamples=args.nsamples, repeats=args.repeats)}
            results.append(row)
            print(arch, json.dumps(row), flush=True)
            (args.out / "time.json").write_text(json.dumps(results, indent=2))
    print(f"| model | bits | group | GPTQ s (median of {args.repeats}) | fp-target s | fp-target / GPTQ (median) |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['arch']} | {row['bits']} | {row['group_size']} | {row['median']['gptq']:.2f} | "
              f"{row['median']['fp-target']:.2f} | {row['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
