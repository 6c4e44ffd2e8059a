"""gptq-tools against its CPU peers on one 1B LLaMA-shaped model: decode and prefill tokens/s, side by side.

1. Builds a LLaMA-shaped fp16 checkpoint (hidden 2048, 16 layers, ffn 5632, 32 heads; random weights and
   random calibration ids; for llama.cpp's converter a sentencepiece tokenizer trained on the tiny models'
   corpus in the llama.cpp venv) and quantizes it
   with ``gptq-tools quantize`` (4-bit, group 128, act-order static; ``--method`` as given, RTN by default since
   the weights are random and only speed is measured here).
2. Peers, each in its own child process so that their memory and threads stay apart:
   * ``gptq-tools``: ``load_quantized(kernel="auto")``, fp32 compute (the exact native kernel);
   * ``transformers fp32``: the same fp16 weights in fp32 ``LlamaForCausalLM``;
   * ``llama.cpp Q4_0`` and ``Q4_K_M`` of the same fp16 weights (``make venv-llamacpp``: llama-cpp-python,
     its sdist's ``convert_hf_to_gguf.py``, ``llama_model_quantize``); skipped with the reason without it.
3. Each measurement: prefill of a 512-token prompt (tokens/s), decode of 64 tokens after a 16-token prompt
   (tokens/s, the prompt excluded), greedy; rounds interleaved across the peers (``--rounds``, default 5),
   medians.
   Also the machine's read bandwidth (2 threads, a 512 MiB sum) and each peer's weight bytes read per token,
   so decode can be read as a share of the bandwidth ceiling.

Every peer runs with ``--threads`` threads (default 2), idle OpenMP workers sleeping (``OMP_WAIT_POLICY=PASSIVE``,
as the gptq-tools CLI sets it). Not in CI (minutes, and the llama.cpp build is an hour).
Writes ``bench-out/cpu-peers/results.json``; prints the table and the ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT = REPO_ROOT / "bench-out" / "cpu-peers"
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 32}
PROMPT_PREFILL, PROMPT_DECODE, NEW_TOKENS = 512, 16, 64


# ----------------------------------------------------------------------------------------------- model
def build_fp16(folder: Path, vocab: int) -> Path:
    """Random fp16 LLaMA weights (written tensor by tensor) and random calibration token ids."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, rms_norm_eps=1e-5, torch_dtype="float16",
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"], **SHAPE)
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(3, vocab, (16, 256), generator=generator)},
              str(folder / "calib.safetensors"))
    hidden, ffn = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(SHAPE["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        shapes.update({f"{prefix}.self_attn.{p}_proj.weight": (hidden, hidden) for p in "qkvo"})
        shapes.update({f"{prefix}.mlp.gate_proj.weight": (ffn, hidden), f"{prefix}.mlp.up_proj.weight": (ffn, hidden),
                       f"{prefix}.mlp.down_proj.weight": (hidden, ffn), f"{prefix}.input_layernorm.weight": (hidden,),
                       f"{prefix}.post_attention_layernorm.weight": (hidden,)})
    state = {name: torch.ones(shape, dtype=torch.float16) if len(shape) == 1 else
             (torch.randn(shape, generator=generator) * shape[1] ** -0.5).to(torch.float16)
             for name, shape in shapes.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


TOKENIZER = """
import sys, sentencepiece
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from gptq_tools.checkpoint.tiny import tiny_corpus
folder = Path(sys.argv[1]); text = folder / "corpus.txt"
text.write_text(tiny_corpus()[0], encoding="utf-8")
sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"),
    vocab_size=int(sys.argv[2]), model_type="bpe", hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    minloglevel=2)
"""


def quantize(fp16: Path, out: Path, method: str, threads: int) -> Path:
    if (out / "quantize_config.json").is_file():
        return out
    command = [sys.executable, "-m", "gptq_tools", "--threads", str(threads), "-q", "quantize", str(fp16), "-o",
               str(out), "--calibration", str(fp16 / "calib.safetensors"), "--bits", "4", "--group-size", "128",
               "--desc-act", "--nsamples", "16", "--seqlen", "256", "--method", method]
    subprocess.run(command, check=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return out


def gguf_files(fp16: Path, llamacpp_python: str, vocab: int) -> dict[str, Path]:
    """Q4_0 and Q4_K_M GGUF files of the fp16 weights (converted once, cached beside them)."""
    sdist = Path(os.path.abspath(llamacpp_python)).parent.parent / "sdist" / "llama_cpp_python-0.3.36"
    converter = sdist / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not (fp16 / "tokenizer.model").is_file():  # llama.cpp's converter needs a tokenizer; ours needs none
        subprocess.run([llamacpp_python, "-c", TOKENIZER, str(fp16), str(vocab), str(REPO_ROOT)], check=True)
        (fp16 / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
             "add_bos_token": True, "add_eos_token": False, "legacy": True}), encoding="utf-8")
    f16 = fp16 / "model-f16.gguf"
    if not f16.is_file():
        subprocess.run([llamacpp_python, str(converter), str(fp16), "--outfile", str(f16), "--outtype", "f16"],
                       check=True)
    out = {}
    for kind in ("Q4_0", "Q4_K_M"):
        target = fp16 / f"model-{kind}.gguf"
        if not target.is_file():
            subprocess.run([llamacpp_python, "-c", LLAMACPP_QUANTIZE, str(f16), str(target), kind], check=True)
        out[kind] = target
    return out


LLAMACPP_QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[sys.argv[3]]
params.nthread = 2
if llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params) != 0:
    raise SystemExit("llama_model_quantize failed")
"""


# ------------------------------------------------------------------------------------------ children
def torch_child(kind: str, folder: str, threads: int) -> dict:
    """Prefill and decode tokens/s of gptq-tools (``kind="gptq"``) or transformers fp32 (``"fp32"``)."""
    import torch

    torch.set_num_threads(threads)
    if kind == "gptq":
        from gptq_tools.runtime.load import load_quantized

        model = load_quantized(folder, dtype=torch.float32, device_map="cpu")
        kernels = sorted({decision.kernel for decision in model.gptq_kernels.values()})
        weight_bytes = sum(buffer.numel() * buffer.element_size() for name, buffer in model.named_buffers()
                           if name.startswith("model.layers"))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        kernels = ["fp32 nn.Linear"]
        weight_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                           if name.startswith("model.layers"))
    model.eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, PROMPT_PREFILL), generator=generator)
    with torch.no_grad():
        model(prompt[:, :8])  # warm-up: kernel builds, first-call allocations
        started = time.perf_counter()
        model(prompt)
        prefill_s = time.perf_counter() - started
        out = model(prompt[:, :PROMPT_DECODE], use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(NEW_TOKENS):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - started
    return {"prefill_tok_s": PROMPT_PREFILL / prefill_s, "decode_tok_s": NEW_TOKENS / decode_s,
            "kernels": kernels, "layer_weight_bytes": weight_bytes}


LLAMACPP_CHILD = """
import json, random, sys, time, llama_cpp
path = sys.argv[1]
threads, n_prefill, n_prompt, n_new = (int(value) for value in sys.argv[2:6])
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                      verbose=False, logits_all=False)
rng = random.Random(0)
vocab = llm.n_vocab()
prompt = [rng.randrange(3, vocab) for _ in range(n_prefill)]
llm.eval(prompt[:8]); llm.reset()
started = time.perf_counter(); llm.eval(prompt); prefill = time.perf_counter() - started
llm.reset(); llm.eval(prompt[:n_prompt])
started = time.perf_counter()
for _ in range(n_new):
    token = int(llm.scores[llm.n_tokens - 1].argmax())
    llm.eval([token])
decode = time.perf_counter() - started
print(json.dumps({"prefill_tok_s": n_prefill / prefill, "decode_tok_s": n_new / decode}))
"""


def run_child(args: list[str], python: str = sys.executable) -> dict:
    done = subprocess.run([python, *args], capture_output=True, text=True, cwd=REPO_ROOT, check=False,
                          env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(REPO_ROOT),
                               "GPTQ_TOOLS_DISABLE_PROGRESS": "1"})
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamacpp", help="python of the llama.cpp venv (make venv-llamacpp)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median; default 5: a shared VM's "
                        "read bandwidth swings by 2x between minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="rtn", help="quantize --method for the checkpoint (default rtn)")
    parser.add_argument("--vocab", type=int, default=8000, help="tokenizer size asked of sentencepiece")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(torch_child(args.child[0], args.child[1], int(args.child[2]))))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    fp16 = build_fp16(OUT / "llama-1b-fp16", args.vocab)
    gptq = quantize(fp16, OUT / f"llama-1b-gptq-{args.method}", args.method, args.threads)
    peers: dict[str, list[str]] = {
        "gptq-tools (auto)": [__file__, "--child", "gptq", str(gptq), str(args.threads)],
        "transformers fp32": [__file__, "--child", "fp32", str(fp16), str(args.threads)]}
    skipped: dict[str, str] = {}
    if args.llamacpp:
        for kind, path in gguf_files(fp16, args.llamacpp, args.vocab).items():
            peers[f"llama.cpp {kind}"] = ["-c", LLAMACPP_CHILD, str(path), str(args.threads), str(PROMPT_PREFILL),
                                          str(PROMPT_DECODE), str(NEW_TOKENS)]
    else:
        skipped["llama.cpp Q4_0 / Q4_K_M"] = "no llama.cpp venv (make venv-llamacpp, about an hour on 2 cores)"
    from bench_kernels import read_bandwidth  # the same probe as make bench-kernels (scripts/ is on sys.path)

    bandwidth = read_bandwidth(args.threads)
    results: dict[str, list[dict]] = {name: [] for name in peers}
    for round_index in range(args.rounds):
        for name, child in peers.items():
            python = args.llamacpp if name.startswith("llama.cpp") else sys.executable
            results[name].append(run_child(child, python))
            print(f"round {round_index + 1} {name}: {results[name][-1]}", flush=True)
    table = {}
    for name, runs in results.items():
        good = [run for run in runs if "error" not in run]
        if not good:
            table[name] = {"error": runs[0]["error"]}
            continue
        table[name] = {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in good),
                       "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in good),
                       **{k: good[0][k] for k in ("kernels", "layer_weight_bytes") if k in good[0]}}
    print(f"\nread bandwidth ({args.threads} threads): {bandwidth:.1f} GB/s; medians of {args.rounds} rounds")
    print(f"{'system':24s} {'decode tok/s':>13s} {'prefill tok/s':>14s}  notes")
    for name, row in table.items():
        if "error" in row:
            print(f"{name:24s} {'-':>13s} {'-':>14s}  failed: {row['error']}")
            continue
        notes = ", ".join(row.get("kernels", []))
        if "layer_weight_bytes" in row:
            gb = row["layer_weight_bytes"] / 1e9
            share = gb * row["decode_tok_s"] / bandwidth
            notes += f"; {gb:.2f} GB of layer weights per token, {share:.0%} of bandwidth"
        print(f"{name:24s} {row['decode_tok_s']:13.2f} {row['prefill_tok_s']:14.1f}  {notes}")
    for name, reason in skipped.items():
        print(f"{name:24s} {'-':>13s} {'-':>14s}  not run: {reason}")
    ours = table.get("gptq-tools (auto)", {})
    ratios = {}
    for peer, key in (("llama.cpp Q4_0", "decode_tok_s"), ("llama.cpp Q4_K_M", "decode_tok_s"),
                      ("transformers fp32", "prefill_tok_s"), ("transformers fp32", "decode_tok_s")):
        if key in ours and key in table.get(peer, {}):
            ratios[f"{key} vs {peer}"] = ours[key] / table[peer][key]
            print(f"gptq-tools {key} / {peer}: {ratios[f'{key} vs {peer}']:.2f}x")
    (OUT / "results.json").write_text(json.dumps({"bandwidth_gb_s": bandwidth, "threads": args.threads,
                                                  "table": table, "ratios": ratios, "skipped": skipped,
                                                  "runs": results}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
