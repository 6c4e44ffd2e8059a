"""Quality benchmark of the quantizers on tiny OPT, BLOOM and LLaMA models the project trains itself.

For each model, bit width (2, 3, 4) and group size (-1, 32, 128), all with static act-order: round-to-nearest,
our plain GPTQ, our fp-target (GPTQ solved against the full-precision model's outputs), each of ours also with
MSE-searched scales, and, with ``--gptqmodel PYTHON`` (a venv where GPTQModel is installed; default
.venv-gptqmodel/bin/python, made by ``make venv-gptqmodel``, when it exists), GPTQModel's GPTQ, GPTAQ (alpha
0.25, its default) and MSE-clipped GPTQ (norm 2.4) on the same calibration windows. Every checkpoint is
scored the same way, through its own qweight/qzeros/scales/g_idx tensors: the mean KL divergence of its
next-token distribution from the fp16 model's on held-out text (much more sensitive than perplexity on
models this small), perplexity, and quantization time.

``--quick`` runs the 3- and 4-bit group-128 rows only (the full matrix takes hours on a shared 2-core machine).

Usage: python scripts/bench_quant.py [--quick] [--out bench-out/quant] [--nsamples 64] [--gptqmodel PYTHON]
Writes OUT/results.json and prints a table (KL in 1e-3, and the ratios the defaults are chosen by).
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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from gptq_tools.checkpoint.tiny import TinySpec, build_tiny_model  # noqa: E402
from gptq_tools.quant.calibration import load_calibration  # noqa: E402 - after the path set-up
from gptq_tools.quant.config import QuantizeConfig  # noqa: E402
from gptq_tools.quant.driver import quantize_model  # noqa: E402
from gptq_tools.quant.evaluate import compare_to_reference, load_for_eval, log_probs  # noqa: E402

DEFAULT_GPTQMODEL = Path(os.environ.get("GPTQMODEL_PYTHON", REPO_ROOT / ".venv-gptqmodel" / "bin" / "python"))
# Trained 4x longer than the demo's model: an undertrained model (perplexity ~257) barely reacts to 4-bit
# rounding, so perplexity differences between methods drown in noise; at 800 steps (~170) they do not.
BENCH_SPEC = TinySpec(steps=800)
SEQLEN = 128
BITS = (2, 3, 4)
GROUPS = (-1, 32, 128)  # 32: below the tiny models' hidden size of 128; 128: one group there, four in the MLP
QUICK = ((3, 128), (4, 128))  # the 3-bit rows first: the ones the methods differ most on
ARCHS = ("opt", "bloom", "llama")
#: Our methods: (row name, quantize_model method, scale search).
OURS = (("gptq", "gptq", "minmax"), ("gptq+mse", "gptq", "mse"), ("fp-target", "fp-target", "minmax"),
        ("fp-target+mse", "fp-target", "mse"))
#: GPTQModel's: (row name, extra arguments of scripts/gptqmodel_quantize.py).
THEIRS = (("gptqmodel-gptq", ()), ("gptqmodel-gptaq", ("--gptaq-alpha", "0.25")),
          ("gptqmodel-gptq+mse", ("--mse", "2.4")))


def _model(arch: str, root: Path, spec: TinySpec = BENCH_SPEC) -> Path:
    folder = root / (f"tiny-{arch}" if spec == BENCH_SPEC else f"tiny-{arch}-{spec.steps}steps")
    stamp = folder / "tiny_spec.json"
    wanted = {"arch": arch, "seed": 0, **spec.__dict__}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return folder
    started = time.perf_counter()
    build_tiny_model(arch, folder, spec=spec, force=True)
    print(f"built tiny {arch} in {time.perf_counter() - started:.1f} s", flush=True)
    return folder


def _ours(model: Path, out: Path, calib: Path, config: QuantizeConfig, nsamples: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    summary = quantize_model(model, out, calibration=calib, config=config, nsamples=nsamples, seqlen=SEQLEN)
    return summary.seconds


def _gptqmodel(python: Path, model: Path, out: Path, calib: Path, config: QuantizeConfig,
               extra: tuple[str, ...]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(python), str(REPO_ROOT / "scripts" / "gptqmodel_quantize.py"), str(model), str(out), str(calib),
            "--bits", str(config.bits), "--group-size", str(config.group_size),
            "--desc-act" if config.desc_act else "--no-desc-act",
            "--static-groups" if config.static_groups else "--no-static-groups", "--damp", str(config.damp_percent),
            *extra]
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": ""}
    # GPTQModel writes a logs/ folder into its working directory: keep it inside the benchmark folder
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, check=False, cwd=out.parent)
    if done.returncode != 0:
        raise RuntimeError(f"GPTQModel failed ({done.returncode}): {done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def evaluation_setup(model: Path, calib: Path, *, nsamples: int) -> Callable[[Path], dict[str, float]]:
    """Write ``nsamples`` calibration windows of the model's ``train.txt`` to ``calib`` (the same ones for
    every run), and return how a checkpoint is scored: its perplexity on ``eval.txt`` and the mean KL of its
    next-token distribution from ``model``'s."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = load_calibration(model / "train.txt", tokenizer, nsamples=nsamples, seqlen=SEQLEN)
    save_file({"input_ids": ids.contiguous()}, str(calib))
    eval_ids = torch.tensor(tokenizer((model / "eval.txt").read_text())["input_ids"], dtype=torch.long)
    reference = log_probs(load_for_eval(model), eval_ids, seqlen=SEQLEN)

    def quality(folder: Path) -> dict[str, float]:
        ppl, kl = compare_to_reference(load_for_eval(folder), eval_ids, reference, seqlen=SEQLEN)
        return {"ppl": ppl, "kl": kl}

    return quality


def bench_case(arch: str, root: Path, *, bits: int, group_size: int, nsamples: int, gptqmodel: Path | None,
               spec: TinySpec = BENCH_SPEC) -> list[dict]:
    """Every method on one model at one bit width and group size (the fp16 row once per model)."""
    model = _model(arch, root, spec)
    calib = root / f"calib-{arch}.safetensors"
    quality = evaluation_setup(model, calib, nsamples=nsamples)
    rows = []
    if not (root / f"fp16-{arch}.json").is_file():
        (root / f"fp16-{arch}.json").write_text(json.dumps({"method": "fp16", **quality(model)}))
    rows.append(json.loads((root / f"fp16-{arch}.json").read_text()))
    out = root / f"out-{arch}"
    base = QuantizeConfig(bits=bits, group_size=group_size, desc_act=True, static_groups=True)
    seconds = _ours(model, out, calib, replace(base, method="rtn"), nsamples)
    rows.append({"method": "rtn", "bits": bits, "group_size": group_size, **quality(out), "seconds": seconds})
    print(arch, rows[-1], flush=True)
    for name, method, scale_search in OURS:
        config = replace(base, method=method, scale_search=scale_search)
        seconds = _ours(model, out, calib, config, nsamples)
        rows.append({"method": name, "bits": bits, "group_size": group_size, **quality(out), "seconds": seconds})
        print(arch, rows[-1], flush=True)
    default = QuantizeConfig(bits=bits, group_size=group_size)
    rows.append({"method": "default", "bits": bits, "group_size": group_size,
                 "is": _row_name(default.method, default.scale_search)})
    for name, extra in THEIRS if gptqmodel is not None else ():
        gm_out = root / f"gptqmodel-{arch}"
        seconds = _gptqmodel(gptqmodel, model, gm_out, calib, base, extra)
        rows.append({"method": name, "bits": bits, "group_size": group_size, **quality(gm_out), "seconds": seconds})
        print(arch, rows[-1], flush=True)
    return rows


def _row_name(method: str, scale_search: str) -> str:
    return method + ("+mse" if scale_search == "mse" else "")


def _cells(result: dict, bits: int, group_size: int) -> dict[str, dict]:
    return {row["method"]: row for row in result["rows"]
            if row.get("bits") == bits and row.get("group_size") == group_size}


def _table(results: list[dict], cases: tuple[tuple[int, int], ...]) -> str:
    """One row per model, bit width and group: KL (1e-3) per method, then the ratios the defaults are chosen by."""
    names = ["rtn"] + [name for name, _, _ in OURS] + [name for name, _ in THEIRS]
    header = ("| model | bits | group | " + " | ".join(f"{name} KL" for name in names)
              + " | default | default/gptq | default/best GPTQModel | ppl fp16 -> default | s gptq / fp-target |")
    lines = [header, "|" + "---|" * (len(names) + 8)]
    for result in results:
        fp16 = result["rows"][0]
        for bits, group_size in cases:
            cells = _cells(result, bits, group_size)
            if not cells:
                continue
            default = cells[cells["default"]["is"]]
            theirs = [cells[name]["kl"] for name, _ in THEIRS if name in cells]
            best_theirs = min(theirs) if theirs else None
            kls = [f"{cells[name]['kl'] * 1e3:.3f}" if name in cells else "" for name in names]
            lines.append("| " + " | ".join([
                result["arch"], str(bits), str(group_size), *kls, cells["default"]["is"],
                f"{default['kl'] / cells['gptq']['kl']:.3f}",
                f"{default['kl'] / best_theirs:.3f}" if best_theirs else "",
                f"{fp16['ppl']:.2f} -> {default['ppl']:.2f}",
                f"{cells['gptq']['seconds']:.1f} / {cells['fp-target']['seconds']:.1f}"]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-out" / "quant")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--gptqmodel", type=Path, default=DEFAULT_GPTQMODEL if DEFAULT_GPTQMODEL.exists() else None)
    parser.add_argument("--no-gptqmodel", action="store_true")
    parser.add_argument("--arch", nargs="+", default=list(ARCHS))
    parser.add_argument("--quick", action="store_true", help="3- and 4-bit group-128 rows only")
    parser.add_argument("--cases", help="BITS:GROUP[,BITS:GROUP...] to run instead (e.g. 2:128,3:-1); their rows "
                        "replace the same cells of an earlier results.json of the same models, the others are kept")
    parser.add_argument("--steps", type=int, default=BENCH_SPEC.steps,
                        help=f"training steps of the tiny models (default {BENCH_SPEC.steps}; fewer builds faster)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    args.out = args.out.absolute()  # GPTQModel runs in another working folder: a relative --out would not be found
    args.out.mkdir(parents=True, exist_ok=True)
    # absolute, not resolved: GPTQModel runs with another working folder, and a venv's python is a symlink
    gptqmodel = None if args.no_gptqmodel or args.gptqmodel is None else args.gptqmodel.absolute()
    cases = QUICK if args.quick else tuple((bits, group) for bits in BITS for group in GROUPS)
    if args.cases:
        cases = parse_cases(parser, args.cases)
    spec = replace(BENCH_SPEC, steps=args.steps)
    # case by case across the models (the 3-bit rows of every model first), saved after each case
    results = _earlier_results(args.out / "results.json", args.arch, spec.steps) if args.cases else \
        [{"arch": arch, "train_steps": spec.steps, "rows": []} for arch in args.arch]
    for bits, group_size in cases:
        for result in results:
            rows = bench_case(result["arch"], args.out, bits=bits, group_size=group_size, nsamples=args.nsamples,
                              gptqmodel=gptqmodel, spec=spec)
            kept = [row for row in result["rows"] if (row.get("bits"), row.get("group_size")) != (bits, group_size)]
            result["rows"] = kept + (rows if not kept else rows[1:])  # the fp16 row once
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
    measured = sorted({(row["bits"], row["group_size"]) for result in results for row in result["rows"]
                       if "bits" in row}, key=lambda case: (case[0], case[1] != -1, case[1]))
    print(_table(results, tuple(measured)))
    return 0


def parse_cases(parser: argparse.ArgumentParser, text: str) -> tuple[tuple[int, int], ...]:
    """``--cases BITS:GROUP[,BITS:GROUP...]`` as (bits, group) pairs; a malformed value is the parser's error."""
    try:
        return tuple((int(b), int(g)) for b, g in (item.split(":") for item in text.split(",")))
    except ValueError:
        parser.error(f"--cases {text!r}: write BITS:GROUP pairs separated by commas, e.g. 2:128,3:-1")


def _earlier_results(path: Path, archs: list[str], steps: int) -> list[dict]:
    """The results of an earlier run on the same models (same training), to add cells to; empty ones else."""
    earlier = {}
    if path.is_file():
        earlier = {r["arch"]: r for r in json.loads(path.read_text()) if r.get("train_steps") == steps}
    return [earlier.get(arch, {"arch": arch, "train_steps": steps, "rows": []}) for arch in archs]


if __name__ == "__main__":
    sys.exit(main())
