#!/usr/bin/env python3
"""The interop matrix: our checkpoints loaded by transformers, GPTQModel and vLLM, logits compared to ours.

For each variant (architecture x group size x act-order x sym/asym x format x bits, pruned: every axis
kept, every default-settings variant kept) a tiny random model is quantized with our CLI, then loaded by

- ``transformers`` (+ optimum + GPTQModel, in GPTQModel's venv) with its default backend, and with
  ``backend="torch"``,
- ``gptqmodel`` (``GPTQModel.load``, default backend),
- ``vllm`` (``LLM(...)`` on CPU, with our BLOOM plugin when gptq-tools is installed in vLLM's venv),

each in its own venv's Python (``GPTQMODEL_PYTHON``, ``VLLM_PYTHON``; defaults ``.venv-gptqmodel``,
``.venv-vllm``), one process per client for all variants. A cell says ``OK <max |logit difference|>``
from ``load_quantized`` (float32 reference; the tolerance is half-precision rounding: three times how
far our own loader's logits move in float16/bfloat16), ``MISMATCH <difference>``, or
``refused: <the client's message>``.

Usage: python scripts/interop.py [--out bench-out/interop] [--arch opt bloom llama] [--only NAME ...]
       [--clients transformers transformers-torch gptqmodel vllm]
Prints the matrix as a Markdown table and writes OUT/results.json. Exit status 1 when a default-settings
variant is not OK everywhere (BLOOM in vLLM counts only with the plugin installed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB = 96
PROMPT = [list(range(3, 35))]  # one prompt of 32 tokens, the same in every client
CLIENTS = ("transformers", "transformers-torch", "gptqmodel", "vllm")
CLIENT_DTYPE = {"transformers": "float16", "transformers-torch": "float16", "gptqmodel": "float16",
                "vllm": "bfloat16"}  # vLLM's CPU backend runs bfloat16


@dataclass(frozen=True)
class Variant:
    """One checkpoint of the matrix: what our CLI is asked to make."""

    arch: str
    bits: int = 4
    group_size: int = 128
    act_order: str = "static"  # "static" (default), "dynamic" or "off"
    sym: bool = True
    fmt: str = "gptq"
    layout: str = "shards"  # "shards" (default), "single" (model.safetensors), "thebloke" (AutoGPTQ's name + keys)

    @property
    def name(self) -> str:
        parts = [self.arch, f"{self.bits}b", f"g{self.group_size}", self.act_order, "sym" if self.sym else "asym",
                 "v1" if self.fmt == "gptq" else "v2"]
        if self.layout != "shards":
            parts.append(self.layout)
        return "-".join(parts)

    @property
    def is_default(self) -> bool:
        return self == Variant(self.arch) or self == Variant(self.arch, layout="single")

    def cli_args(self) -> list[str]:
        args = ["--bits", str(self.bits), "--group-size", str(self.group_size),
                "--desc-act" if self.act_order != "off" else "--no-desc-act",
                "--static-groups" if self.act_order == "static" else "--no-static-groups",
                "--sym" if self.sym else "--asym", "--format", self.fmt]
        if self.layout == "single":
            args.append("--single-file")
        if self.layout == "thebloke":
            args.append("--autogptq-name")
        return args


def variants(archs: list[str]) -> list[Variant]:
    """Every default-settings variant, then each axis moved away from the defaults, one or two at a time.

    OPT carries every axis; BLOOM and LLaMA repeat the defaults and the settings that differ by
    architecture (act-order with groups, TheBloke's layout for BLOOM, asymmetric v2).
    """
    chosen: list[Variant] = []
    for arch in archs:
        chosen += [Variant(arch), Variant(arch, layout="single")]  # the defaults: shards, --single-file
        chosen += [Variant(arch, group_size=32, act_order="dynamic")]  # act-order, dynamic groups
        if arch == "opt":
            chosen += [
                Variant(arch, group_size=32),  # static act-order, smaller groups
                Variant(arch, group_size=-1, act_order="dynamic"),
                Variant(arch, group_size=128, act_order="off"),
                Variant(arch, group_size=32, act_order="off", sym=False, fmt="gptq"),  # asym v1
                Variant(arch, group_size=32, sym=False, fmt="gptq_v2"),  # asym v2
                Variant(arch, fmt="gptq_v2"),  # sym v2
                Variant(arch, bits=8),
            ]
        elif arch == "bloom":
            chosen += [Variant(arch, group_size=-1, act_order="dynamic", layout="thebloke")]  # bloomz-176B-GPTQ
        else:
            chosen += [Variant(arch, group_size=32, sym=False, fmt="gptq_v2")]
    return chosen


# ---------------------------------------------------------------------------------------------------
# our side (runs in the gptq-tools venv)


def float_model(folder: Path, arch: str) -> Path:
    """A tiny random float16 model (hidden 128, 2 layers) with a word-level tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT / "scripts")]
    from interop_gptqmodel import save_tokenizer
    from tiny_gptq import tiny_config

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = tiny_config(arch, hidden=128, vocab=VOCAB)
    config.initializer_range = 0.2  # logits of a few units, so that a wrong kernel shows
    model = AutoModelForCausalLM.from_config(config).to(torch.float16)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def calibration(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    save_file({"input_ids": torch.randint(3, VOCAB, (16, 64), generator=generator)}, str(path))
    return path


def quantize(variant: Variant, source: Path, out: Path, calib: Path) -> dict[str, Any]:
    """Run our CLI; returns its exit status and the warnings it printed."""
    if (out / "SHA256SUMS").is_file():
        return {"returncode": 0, "warnings": json.loads((out.parent / f"{out.name}.warnings.json").read_text())}
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GPTQ_TOOLS_DISABLE_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "gptq_tools", "quantize", str(source), "-o", str(out),
                           "--calibration", str(calib), "--nsamples", "16", "--seqlen", "64", *variant.cli_args()],
                          env=env, capture_output=True, text=True, check=False)
    warnings = [line.removeprefix("gptq-tools: warning: ") for line in done.stderr.splitlines()
                if line.startswith("gptq-tools: warning: ")]
    if done.returncode != 0:
        raise SystemExit(f"interop: quantizing {variant.name} failed:\n{done.stderr[-3000:]}")
    if variant.layout == "thebloke":
        _thebloke_config(out)
    (out.parent / f"{out.name}.warnings.json").write_text(json.dumps(warnings))
    return {"returncode": done.returncode, "warnings": warnings}


def _thebloke_config(folder: Path) -> None:
    """Make the configs read like TheBloke's bloomz-176B-GPTQ: AutoGPTQ's keys only, ``desc_act: true``."""
    for name in ("quantize_config.json", "config.json"):
        data = json.loads((folder / name).read_text())
        qconfig = data if name == "quantize_config.json" else data["quantization_config"]
        for key in ("format", "meta", "checkpoint_format"):
            qconfig.pop(key, None)
        qconfig["desc_act"] = True
        (folder / name).write_text(json.dumps(data, indent=2) + "\n")


def our_logits(folder: Path, dtype: str = "float32") -> Any:
    import torch

    from gptq_tools.runtime.load import load_quantized

    model = load_quantized(folder, dtype=getattr(torch, dtype), device_map="cpu", verify_hash=False)
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits[0].float()


def references(folder: Path) -> dict[str, Any]:
    """Our logits in float32 (the reference) and, for each client dtype, how far our own loader moves in it."""
    reference = our_logits(folder)
    rounding = {dtype: float((our_logits(folder, dtype) - reference).abs().max())
                for dtype in sorted(set(CLIENT_DTYPE.values()))}
    return {"float32": reference, "rounding": rounding}


# ---------------------------------------------------------------------------------------------------
# the clients' side (runs in the client's venv; imports nothing of ours)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _worker_transformers(folder: Path, backend: str | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, GPTQConfig

    kwargs: dict[str, Any] = {}
    if backend:
        bits = json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]
        kwargs["quantization_config"] = GPTQConfig(bits=bits, backend=backend)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16, device_map="cpu", **kwargs)
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits[0].float()


def _worker_gptqmodel(folder: Path) -> Any:
    import torch
    from gptqmodel import GPTQModel

    model = GPTQModel.load(str(folder), device="cpu", dtype=torch.float16)
    with torch.no_grad():
        return model.model(torch.tensor(PROMPT)).logits[0].float()


def _worker_vllm(folder: Path) -> Any:
    import gc

    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype="bfloat16", max_model_len=128, enforce_eager=True, max_logprobs=-1,
              logprobs_mode="raw_logits", seed=0)
    try:
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=-1, logprobs=-1)
        result = llm.generate([{"prompt_token_ids": PROMPT[0]}], params, use_tqdm=False)[0]
        # raw_logits mode: entry i of prompt_logprobs is position i-1's logits; the sample's are the last
        rows = [entry for entry in result.prompt_logprobs[1:]] + [result.outputs[0].logprobs[0]]
        logits = torch.full((len(rows), VOCAB), float("nan"))
        for position, entry in enumerate(rows):
            for token, logprob in entry.items():
                if token < VOCAB:
                    logits[position, token] = logprob.logprob
        return logits
    finally:
        del llm
        gc.collect()


def worker(client: str, folders: list[Path], results: Path) -> int:
    """Load every folder with ``client``; write ``results`` (JSON) and one logits file per loaded folder."""
    import torch

    rows = {}
    for folder in folders:
        started = time.perf_counter()
        try:
            if client == "transformers":
                logits = _worker_transformers(folder, None)
            elif client == "transformers-torch":
                logits = _worker_transformers(folder, "torch")
            elif client == "gptqmodel":
                logits = _worker_gptqmodel(folder)
            else:
                logits = _worker_vllm(folder)
        except Exception as exc:  # noqa: BLE001 - every refusal is a result of the matrix
            rows[str(folder)] = {"status": "refused", "message": _one_line(exc)}
        else:
            path = results.parent / f"{folder.name}.{client}.pt"
            torch.save(logits, path)
            rows[str(folder)] = {"status": "loaded", "logits": str(path)}
        rows[str(folder)]["seconds"] = time.perf_counter() - started
        results.write_text(json.dumps(rows, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------
# the matrix


def client_python(client: str) -> Path:
    from gptq_tools import constants

    return constants.vllm_python() if client == "vllm" else constants.gptqmodel_python()


def run_client(client: str, folders: list[Path], out: Path) -> dict[str, Any]:
    python = client_python(client).absolute()  # the workers run in OUT; never resolve(): a venv's python is a link
    if not python.exists():
        return {str(f): {"status": "skipped", "message": f"no {python}"} for f in folders}
    results = out / f"results-{client}.json"
    results.unlink(missing_ok=True)  # a stale file from an earlier run must not pass for this one
    env = {**os.environ, "PYTHONPATH": "", "GPTQMODEL_CPU_WORKERS": "2", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    # GPTQModel writes a logs/ folder into its working directory: keep it in OUT
    done = subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", client, "--results", str(results),
                           *map(str, folders)], env=env, cwd=out, capture_output=True, text=True, check=False)
    (out / f"log-{client}.txt").write_text(done.stdout + done.stderr)
    rows = json.loads(results.read_text()) if results.is_file() else {}
    for folder in folders:
        rows.setdefault(str(folder), {"status": "crashed", "message": f"the {client} process exited "
                                                                       f"{done.returncode}; see log-{client}.txt"})
    return rows


def compare(ours: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """A client's logits against ours in float32.

    The tolerance is half-precision rounding: three times the largest move of our own loader's logits
    when it runs in float16 or bfloat16 (the clients' kernels run in one or the other, and on CPU
    GPTQModel's fused kernel in bfloat16 whatever the model's dtype).
    """
    import torch

    if row["status"] != "loaded":
        return row
    reference, rounding = ours["float32"], max(ours["rounding"].values())
    theirs = torch.load(row["logits"])
    known = ~torch.isnan(theirs)
    difference = float((theirs[known] - reference[known]).abs().max())
    tolerance = 3 * rounding
    return {**row, "max_abs_diff": difference, "tolerance": tolerance, "own_rounding": rounding,
            "status": "ok" if difference <= tolerance else "mismatch"}


def cell(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return f"OK {row['max_abs_diff']:.3f}"
    if row["status"] == "mismatch":
        return f"MISMATCH {row['max_abs_diff']:.3f}"
    return f"{row['status']}: {row.get('message', '')}".replace("|", "/")


def table(results: list[dict[str, Any]], clients: list[str]) -> str:
    lines = ["| variant | default | tolerance | " + " | ".join(clients) + " |", "|" + "---|" * (len(clients) + 3)]
    for result in results:
        cells = [result["variant"], "yes" if result["default"] else "", f"{3 * result['rounding']:.3f}"]
        cells += [cell(result[c]) for c in clients]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-out" / "interop")
    parser.add_argument("--arch", nargs="+", default=["opt", "bloom", "llama"])
    parser.add_argument("--only", nargs="+", help="variant names to run (default: all)")
    parser.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=CLIENTS)
    parser.add_argument("--worker", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("folders", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.folders, args.results)
    sys.path.insert(0, str(REPO_ROOT))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    calib = calibration(out / "calibration.safetensors")
    chosen = [v for v in variants(args.arch) if not args.only or v.name in args.only]
    results = []
    for variant in chosen:
        folder = out / variant.name
        made = quantize(variant, float_model(out / f"float-{variant.arch}", variant.arch), folder, calib)
        results.append({"variant": variant.name, "default": variant.is_default, "settings": asdict(variant),
                        "warnings": made["warnings"], "folder": folder})
        print(f"quantized {variant.name}", file=sys.stderr, flush=True)
    ours = {result["variant"]: references(result["folder"]) for result in results}
    for result in results:
        result["rounding"] = max(ours[result["variant"]]["rounding"].values())
    for client in args.clients:
        started = time.perf_counter()
        rows = run_client(client, [r["folder"] for r in results], out)
        for result in results:
            result[client] = compare(ours[result["variant"]], rows[str(result["folder"])])
        print(f"{client}: {len(results)} variants in {time.perf_counter() - started:.0f} s", file=sys.stderr,
              flush=True)
    for result in results:
        result["folder"] = str(result["folder"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results, args.clients))
    failed = [r["variant"] for r in results if r["default"] and any(r[c]["status"] not in ("ok", "skipped")
                                                                    for c in args.clients)]
    if failed:
        print(f"default-settings variants not loaded everywhere: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
