#!/usr/bin/env python3
"""``make demo``: the main job end to end on a built-in tiny model, printing every command it runs.

Each step is the real ``gptq-tools`` command a user would type, run as a subprocess, with its real
output. Everything is written under ``demo-out/`` (removed and rebuilt on each run).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "demo-out"


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*args: str, expect: int | None = 0) -> str:
    """Run ``gptq-tools ARGS`` and echo it with its output; fail the demo on an unexpected exit status
    (``expect=None`` accepts any)."""
    shown = " ".join(shlex.quote(str(a)).replace(str(OUT) + "/", "") for a in args)
    print(f"$ gptq-tools {shown}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GPTQ_TOOLS_DISABLE_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "gptq_tools", *map(str, args)], cwd=OUT, env=env,
                          capture_output=True, text=True, check=False)
    text = (done.stdout + done.stderr).replace(str(OUT) + "/", "")
    print(text.rstrip(), flush=True)
    if expect is not None and done.returncode != expect:
        raise SystemExit(f"demo: step failed with exit status {done.returncode} (expected {expect})")
    return done.stdout


def build_tiny_model(folder: Path) -> Path:
    """A tiny OPT trained here, deterministically, on text every Python install ships (its stdlib docs)."""
    from gptq_tools import build_tiny_model as build

    started = time.monotonic()
    path = build("opt", folder, seed=0)
    print(f"trained {path.relative_to(OUT)}/ in {time.monotonic() - started:.0f} s: config.json, model.safetensors "
          f"(fp16), tokenizer, train.txt (calibration) and eval.txt (held-out text)")
    return path


def publish_like_the_seed(quantized: Path, folder: Path) -> None:
    """A folder shaped like the seed's main branch: configs, tokenizer, and the weights as split parts."""
    folder.mkdir()
    for item in quantized.iterdir():
        if item.suffix != ".safetensors" and item.name != "SHA256SUMS":
            shutil.copy2(item, folder / item.name)
    weights = quantized / "model.safetensors"
    run("split", str(weights.relative_to(OUT)), "--max-size", "300KiB", "-o", str(folder.relative_to(OUT)))


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    step("1. build a tiny model (OPT architecture, trained on offline text)")
    build_tiny_model(OUT / "tiny-opt")
    step("2. quantize it like the seed's main branch: GPTQ 4-bit, act-order, no grouping, one file (and RTN)")
    quantize_args = ("--calibration", "tiny-opt/train.txt", "--bits", "4", "--group-size", "-1", "--seqlen", "128",
                     "--single-file")
    run("quantize", "tiny-opt", "-o", "tiny-opt-gptq", *quantize_args, "--desc-act", "--nsamples", "64")
    run("quantize", "tiny-opt", "-o", "tiny-opt-rtn", *quantize_args, "--method", "rtn", "--nsamples", "8")
    step("3. quality on held-out text: perplexity, and KL divergence from the fp16 model (which shows what "
         "perplexity hides on a tiny model)")
    for quantized in ("tiny-opt-rtn", "tiny-opt-gptq"):
        run("eval", quantized, "--text", "tiny-opt/eval.txt", "--against", "tiny-opt", "--seqlen", "128",
            "--max-tokens", "8192")
    step("4. check the checkpoint: structure (config vs tensors) and its SHA256SUMS")
    run("verify", "--structure", "tiny-opt-gptq")
    run("verify", "-c", "tiny-opt-gptq/SHA256SUMS")
    step("5. publish it the way the seed repositories are: byte parts + SHA256SUMS")
    publish_like_the_seed(OUT / "tiny-opt-gptq", OUT / "published")
    run("inspect", "published")
    step("6. plan placements before loading: two (imaginary) GPUs, caps too small, then this machine's CPU")
    run("plan", "published", "--gpus", "2x2GiB", "--seq-len", "128")
    run("plan", "published", "--max-memory", "0=1GiB,1=1GiB", "--seq-len", "128", expect=1)
    run("plan", "published", "--max-memory", "cpu=1GiB", "--seq-len", "128")
    step("7. load straight from the parts (hash checked against SHA256SUMS, nothing joined) and generate")
    print("(a 4-layer model trained for a minute on Python docstrings: expect docstring-flavoured babble)")
    run("generate", "published", "--max-memory", "cpu=1GiB", "--prompt", "Return a", "--max-new-tokens", "24",
        "--sample", "--seed", "0")
    step("8. join the parts, verifying the published SHA256 in the same pass")
    run("join", "published")
    run("verify", "--parts", "published")
    step("9. a damaged part is caught, and nothing is written")
    damaged = OUT / "damaged"
    shutil.copytree(OUT / "published", damaged)
    (damaged / "model.safetensors").unlink()
    part = next(damaged.glob("*.split-b.safetensors"))
    data = bytearray(part.read_bytes())
    data[100] ^= 0x01
    part.write_bytes(bytes(data))
    run("join", "damaged", expect=1)
    print(f"(damaged/model.safetensors exists: {(damaged / 'model.safetensors').exists()})")
    step("10. reshard the joined checkpoint into loadable shards with an index")
    run("reshard", "published/model.safetensors", "-o", "sharded", "--max-shard-size", "400KB")
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; everything is in {OUT.relative_to(REPO_ROOT)}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
