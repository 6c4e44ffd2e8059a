"""Quality benchmark of the GPTQ quantizer on tiny OPT and BLOOM models the project trains itself.

For each model: perplexity on held-out text at fp16, RTN and GPTQ at 4 and 3 bits (group -1 and a real
group size, act-order off, dynamic and, with groups, static), the mean KL divergence of each quantized
model's next-token distribution from the fp16 model's (much more sensitive than perplexity on models this small), and
quantization time. With ``--gptqmodel PYTHON`` (a venv where GPTQModel is installed; default
.venv-gptqmodel/bin/python, made by ``make venv-gptqmodel``, when it exists) the same model, calibration
windows and settings are also quantized by GPTQModel and evaluated the same way (both checkpoints are read
through their own qweight/qzeros/scales/g_idx tensors).

Usage: python scripts/bench_quant.py [--out bench-out/quant] [--nsamples 64] [--gptqmodel PYTHON]
Writes OUT/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
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
BITS = (4, 3)  # 4-bit is the target; 3-bit shows the methods apart where the tiny models feel quantization
REPEATS = 2  # timing repeats for the side-by-side (the fastest counts)
GROUPED = 32  # the largest power-of-two group below the tiny models' hidden size of 128


def _model(arch: str, root: Path) -> Path:
    folder = root / f"tiny-{arch}"
    stamp = folder / "tiny_spec.json"
    wanted = {"arch": arch, "seed": 0, **BENCH_SPEC.__dict__}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return folder
    started = time.perf_counter()
    build_tiny_model(arch, folder, spec=BENCH_SPEC, force=True)
    print(f"built tiny {arch} in {time.perf_counter() - started:.1f} s", flush=True)
    return folder


def _ours(model: Path, out: Path, calib: Path, config: QuantizeConfig, method: str, nsamples: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    summary = quantize_model(model, out, calibration=calib, config=config, nsamples=nsamples, seqlen=SEQLEN,
                             method=method)
    return summary.seconds


def _gptqmodel(python: Path, model: Path, out: Path, calib: Path, config: QuantizeConfig) -> float:
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(python), str(REPO_ROOT / "scripts" / "gptqmodel_quantize.py"), str(model), str(out), str(calib),
            "--bits", str(config.bits), "--group-size", str(config.group_size),
            "--desc-act" if config.desc_act else "--no-desc-act", "--damp", str(config.damp_percent)]
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": ""}
    # GPTQModel writes a logs/ folder into its working directory: keep it inside the benchmark folder
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200, check=False, cwd=out.parent)
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


def bench_arch(arch: str, root: Path, *, nsamples: int, gptqmodel: Path | None) -> dict:
    model = _model(arch, root)
    calib = root / f"calib-{arch}.safetensors"
    quality = evaluation_setup(model, calib, nsamples=nsamples)

    rows = [{"method": "fp16", **quality(model)}]
    out = root / f"out-{arch}"
    for bits, group_size in itertools.product(BITS, (-1, GROUPED)):
        config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=False)
        seconds = _ours(model, out, calib, config, "rtn", nsamples)
        rows.append({"method": "rtn", "bits": bits, "group_size": group_size, **quality(out), "seconds": seconds})
        print(arch, rows[-1], flush=True)
        # static act-order (our default) only differs from dynamic when there are groups
        for act_order in ("off", "dynamic") + (("static",) if group_size != -1 else ()):
            config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=act_order != "off",
                                    static_groups=act_order == "static")
            seconds = _ours(model, out, calib, config, "gptq", nsamples)
            row = {"method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
                   **quality(out), "seconds": seconds}
            if gptqmodel is not None and group_size == GROUPED and act_order == "dynamic":
                # the machine is shared: time both tools alternately, REPEATS times, and keep the fastest
                gm_out = root / f"gptqmodel-{arch}"
                gm_times = []
                for _ in range(REPEATS):
                    gm_times.append(_gptqmodel(gptqmodel, model, gm_out, calib, config))
                    row["seconds"] = min(row["seconds"], _ours(model, out, calib, config, "gptq", nsamples))
                row["gptqmodel_seconds"] = min(gm_times)
                gm_quality = quality(gm_out)
                row["gptqmodel_ppl"], row["gptqmodel_kl"] = gm_quality["ppl"], gm_quality["kl"]
            rows.append(row)
            print(arch, row, flush=True)
    return {"arch": arch, "rows": rows}


def _table(results: list[dict]) -> str:
    header = ("| model | method | bits | group | act-order | ppl | KL vs fp16 (1e-3) | seconds | GPTQModel ppl "
              "| GPTQModel KL (1e-3) | GPTQModel s | ppl ratio | time ratio |")
    lines = [header, "|" + "---|" * 13]
    for result in results:
        for row in result["rows"]:
            gm_ppl, gm_kl, gm_s = row.get("gptqmodel_ppl"), row.get("gptqmodel_kl"), row.get("gptqmodel_seconds")
            cells = [result["arch"], row["method"], row.get("bits", 16), row.get("group_size", ""),
                     row.get("desc_act", ""), f"{row['ppl']:.3f}", f"{row['kl'] * 1e3:.3f}",
                     f"{row.get('seconds', 0):.1f}"]
            if gm_ppl is None:
                cells += ["", "", "", "", ""]
            else:
                cells += [f"{gm_ppl:.3f}", f"{gm_kl * 1e3:.3f}", f"{gm_s:.1f}", f"{row['ppl'] / gm_ppl:.4f}",
                          f"{row['seconds'] / gm_s:.3f}"]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-out" / "quant")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--gptqmodel", type=Path, default=DEFAULT_GPTQMODEL if DEFAULT_GPTQMODEL.exists() else None)
    parser.add_argument("--no-gptqmodel", action="store_true")
    parser.add_argument("--arch", nargs="+", default=["opt", "bloom"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    # absolute, not resolved: GPTQModel runs with another working folder, and a venv's python is a symlink
    gptqmodel = None if args.no_gptqmodel or args.gptqmodel is None else args.gptqmodel.absolute()
    results = [bench_arch(arch, args.out, nsamples=args.nsamples, gptqmodel=gptqmodel) for arch in args.arch]
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
