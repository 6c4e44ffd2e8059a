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


def run(*args: str, expect: int = 0) -> str:
    """Run ``gptq-tools ARGS`` and echo it with its output; fail the demo on an unexpected exit status."""
    shown = " ".join(shlex.quote(str(a)).replace(str(OUT) + "/", "") for a in args)
    print(f"$ gptq-tools {shown}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GPTQ_TOOLS_DISABLE_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "gptq_tools", *map(str, args)], cwd=OUT, env=env,
                          capture_output=True, text=True, check=False)
    text = (done.stdout + done.stderr).replace(str(OUT) + "/", "")
    print(text.rstrip(), flush=True)
    if done.returncode != expect:
        raise SystemExit(f"demo: step failed with exit status {done.returncode} (expected {expect})")
    return done.stdout


def build_model_file(folder: Path) -> Path:
    """A small safetensors model file: a tiny OPT from transformers, its weights in fp16."""
    import torch
    from safetensors.torch import save_file
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4, ffn_dim=512, num_attention_heads=4,
                       max_position_embeddings=256, word_embed_proj_dim=128)
    model = OPTForCausalLM(config).half()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    save_file(state, str(path), metadata={"format": "pt"})
    config.save_pretrained(folder)
    return path


def main() -> int:
    started = time.monotonic()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    step("1. build a small safetensors model (tiny OPT)")
    model = build_model_file(OUT / "model")
    print(f"wrote {model.relative_to(OUT)} ({model.stat().st_size} bytes)")
    step("2. split it for publishing, as the seed repositories are (parts + SHA256SUMS)")
    run("split", "model/model.safetensors", "--max-size", "400KiB", "-o", "published")
    step("3. join the parts, verifying the published SHA256 in the same pass")
    run("join", "published", "-o", "joined.safetensors")
    step("4. verify: manifest (sha256sum -c style), straight from the parts, and structure")
    run("verify", "-c", "published/SHA256SUMS", "--ignore-missing")
    run("verify", "--parts", "published")
    run("verify", "--structure", "joined.safetensors")
    step("5. a damaged part is caught before anything is written")
    damaged = OUT / "damaged"
    shutil.copytree(OUT / "published", damaged)
    part = damaged / "model.JOINBEFOREUSE.split-b.safetensors"
    data = bytearray(part.read_bytes())
    data[100] ^= 0x01
    part.write_bytes(bytes(data))
    run("join", "damaged", "-o", "damaged.safetensors", expect=1)
    print(f"(damaged.safetensors exists: {(OUT / 'damaged.safetensors').exists()})")
    step("6. inspect the part set and reshard the joined file into loadable shards")
    run("inspect", "published")
    run("reshard", "joined.safetensors", "-o", "sharded", "--max-shard-size", "300KB")
    print(f"\ndemo finished in {time.monotonic() - started:.1f} s; files are in {OUT.relative_to(REPO_ROOT)}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
