"""Benchmark the QuantLinear kernels against fp32 ``nn.Linear`` (CPU) and fp16 ``nn.Linear`` (CUDA).

Every ratio is measured side by side in one run, with ``torch.set_num_threads(THREADS)`` for both sides
and the median of several repetitions:

1. CPU decode (1 token): ``kernel="auto"`` vs an fp32 ``nn.Linear`` holding the same (dequantized)
   weights, 4-bit act-order with group 128 and group -1, on 7168x7168, 7168x28672, 28672x7168 and
   14336x57344 (in x out); goal >= 3x faster, and an effective bandwidth (the bytes the kernel holds, read once
   per token) of at least 50% of this machine's read bandwidth (a 512 MiB sum, same threads). Every other
   4-bit CPU kernel follows (each native build, ``cpu-int4``); one this CPU cannot run is a row with its reason
   (``ATEN_CPU_CAPABILITY=avx2`` makes an AVX-512 machine pick and measure the AVX2 build). The resident
   bytes of each repacked layer are compared
   with its checkpoint bytes (goal <= 1.1x), and its error on fp32 input with the error of rounding the fp32
   reference to fp16 ("err ... x fp16 rounding"; below 1: within fp16 rounding). ``cpu-int4`` (PyTorch's bf16
   op) gets the same rows where auto took another kernel. Also: the reference ``torch`` kernel, and the
   2/3/8-bit fallbacks, against the reference (goal: faster than it).
2. CPU prefill (128 and 512 tokens) on the OPT-30B shapes; goal: no worse than 1.3x the fp32 GEMM; and
   each kernel's matmul vs its dequantize+GEMM path by token count (where each ``PREFILL_TOKENS`` comes from).
3. End to end: ``gptq-tools generate`` decode tokens/s on a synthetic OPT-1.3B-shaped 4-bit checkpoint
   (random weights, cached in ``bench-out/kernels/``) vs transformers running the same dequantized
   model in fp32; goal >= 1.5x, greedy tokens equal to the reference kernel's (and, teacher-forced on them,
   each step's top-two logit margin against the kernels' largest logit difference, where random weights give
   near-ties); ``cpu-int4`` alongside for comparison; resident weight bytes after load <= 1.1x the
   checkpoint's packed bytes.
4. GPU (only with CUDA): the same shapes vs fp16 ``nn.Linear`` at batch 1, 16 and 64.

Prints a table of every ratio and the kernel each case used, and writes ``bench-out/kernels/results.json``.
Exit status 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402  (after the path insert, like the other scripts)

from gptq_tools.checkpoint.packing import pack_qzeros  # noqa: E402
from gptq_tools.runtime.qlinear import QuantLinear  # noqa: E402

THREADS = 2
OUT = REPO_ROOT / "bench-out" / "kernels"
DECODE_SHAPES = [(7168, 7168), (7168, 28672), (28672, 7168), (14336, 57344)]
PREFILL_SHAPES = [(7168, 7168), (7168, 28672), (28672, 7168)]
GPU_BATCHES = (1, 16, 64)
OPT_1B3 = {"model_type": "opt", "hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192,
           "num_attention_heads": 32, "vocab_size": 50272, "max_position_embeddings": 2048,
           "word_embed_proj_dim": 2048, "torch_dtype": "float16", "tie_word_embeddings": True,
           "do_layer_norm_before": True, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}
QUANTIZE = {"bits": 4, "group_size": 128, "desc_act": True, "sym": True, "quant_method": "gptq",
            "checkpoint_format": "gptq"}
PROMPT = "The quick brown fox jumps over the lazy dog because"
NEW_TOKENS, REFERENCE_TOKENS = 32, 3  # the reference kernel dequantizes 1.2B weights per token: ~1 min each


def median_seconds(call: Callable[..., object], *args: object, repeats: int,
                   sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``call(*args)`` after one warm-up call, over ``repeats`` calls or, for a short call,
    as many as fill about a quarter of a second (at most 200): a 1 ms call's median of 5 on a shared VM moves by
    a third between runs, one of 200 does not."""
    started = time.perf_counter()
    call(*args)
    sync()
    first = time.perf_counter() - started
    times = []
    for _ in range(max(repeats, min(200, int(0.25 / max(first, 1e-6))))):
        started = time.perf_counter()
        call(*args)
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def random_layer(bits: int, group_size: int, in_features: int, out_features: int, *, act_order: bool,
                 device: str = "cpu", seed: int = 0) -> QuantLinear:
    """A QuantLinear with random packed words, symmetric zeros, random fp16 scales (fast to build)."""
    generator = torch.Generator().manual_seed(seed)
    layer = QuantLinear(bits, group_size, in_features, out_features, bias=False, dtype=torch.float16,
                        device="meta", kernel="auto")
    words = in_features * bits // 32
    qweight = torch.empty(words, out_features, dtype=torch.int32)
    for start in range(0, words, 256):  # in slices: torch.randint on a 400M-word tensor needs 8 bytes each
        stop = min(start + 256, words)
        qweight[start:stop] = torch.randint(-2**31, 2**31 - 1, (stop - start, out_features), dtype=torch.int32,
                                            generator=generator)
    groups = layer.num_groups
    layer.qweight = qweight
    layer.qzeros = pack_qzeros(torch.full((groups, out_features), 2 ** (bits - 1)), bits)
    layer.scales = (torch.rand(groups, out_features, generator=generator) * 0.004 + 0.001).to(torch.float16)
    g_idx = torch.arange(in_features) // layer.group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    layer.g_idx = g_idx.to(torch.int32)
    layer.name = f"{bits}bit-{group_size}g-{in_features}x{out_features}"
    layer.prepare()
    return layer.to(device)


def dense_copy(layer: QuantLinear, dtype: torch.dtype, device: str = "cpu") -> torch.nn.Linear:
    """An ``nn.Linear`` holding the layer's dequantized weight (built in column slices: bounded memory)."""
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    weight = torch.empty(layer.out_features, layer.in_features, dtype=dtype, device=device)
    step = max(64, (1 << 24) // layer.in_features // 64 * 64)
    order = layer.input_perm.long() if layer.input_perm is not None else None
    for start in range(0, layer.out_features, step):
        stop = min(start + step, layer.out_features)
        block = layer.dequantized_columns(start, stop, dtype).t()  # (c, in), sorted input order
        if order is None:
            weight[start:stop] = block
        else:
            weight[start:stop, order] = block
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return linear


def held_bytes(layer: QuantLinear) -> int:
    return sum(t.numel() * t.element_size() for t in layer.buffers())


def checkpoint_bytes(bits: int, group_size: int, in_features: int, out_features: int) -> int:
    groups = math.ceil(in_features / (group_size if group_size > 0 else in_features))
    return in_features * bits // 8 * out_features + groups * out_features * (bits / 8 + 2) + in_features * 4


# --------------------------------------------------------------------------------------------- CPU
def error_vs_fp16(layer: QuantLinear, dense: torch.nn.Linear, x: torch.Tensor) -> float:
    """The kernel's error on fp32 input against the fp32 dequantized reference, in units of the error of
    rounding that reference to fp16 (below 1: within fp16 rounding)."""
    expected = dense(x)
    error = (layer(x).float() - expected).norm() / expected.norm()
    return float(error / ((expected.half().float() - expected).norm() / expected.norm()))


def try_select(layer: QuantLinear, device: str = "cpu") -> tuple[str, str | None]:
    """``(kernel, None)``, or ``(requested kernel, why it cannot run here)``: a row, never a crash."""
    from gptq_tools.errors import UsageError

    try:
        return layer.select_kernel(device), None
    except UsageError as exc:
        return layer.kernel, str(exc).split("is unsupported here: ", 1)[-1]


def read_bandwidth(threads: int) -> float:
    """This machine's read bandwidth in GB/s with ``threads`` threads: the median of summing a 512 MiB fp32
    tensor (far larger than any cache), the bound a decode step that reads every weight once cannot pass."""
    torch.set_num_threads(threads)
    data = torch.ones(128 << 20, dtype=torch.float32)
    seconds = median_seconds(torch.sum, data, repeats=5)
    return data.numel() * 4 / seconds / 1e9


def resident_weight_bytes(layer: QuantLinear) -> int:
    """Bytes a decode step reads: every buffer the layer's kernel holds (weights, scales, zeros)."""
    return sum(buffer.numel() * buffer.element_size() for buffer in layer.buffers())


def cpu_decode(rows: list[dict], shapes: list[tuple[int, int]], repeats: int, bandwidth: float) -> None:
    """``kernel="auto"`` (the goal), then every other CPU 4-bit kernel for comparison: each build of the native
    kernel and ``cpu-int4`` (PyTorch's bf16 op); a kernel this CPU cannot run is a row with its reason."""
    from gptq_tools.runtime.kernels import cpu_int4_native

    for in_features, out_features in shapes:
        for group_size in (128, -1):
            dense = dense_copy(random_layer(4, group_size, in_features, out_features, act_order=True), torch.float32)
            x = torch.randn(1, in_features)
            check = x.to(torch.float16)
            fp32 = median_seconds(dense, x, repeats=repeats)
            case = f"4bit g{group_size} act {in_features}x{out_features}"
            taken: set[str] = set()
            for requested in ("auto", *cpu_int4_native.NAMES, "cpu-int4"):
                layer = random_layer(4, group_size, in_features, out_features, act_order=True)  # same weights
                layer.kernel = requested
                kernel, reason = try_select(layer)
                if reason is not None:
                    rows.append({"section": "cpu decode", "case": case, "kernel": requested, "unsupported": reason})
                    print_row(rows[-1])
                    continue
                if requested != "auto" and kernel in taken:
                    continue  # auto's row has it already
                taken.add(kernel)
                assert torch.allclose(layer(check).float(), dense(x), rtol=0.05,
                                      atol=0.05 * float(dense(x).abs().max()))
                ours = median_seconds(layer, check, repeats=repeats)
                memory = held_bytes(layer) / checkpoint_bytes(4, group_size, in_features, out_features)
                gb_per_s = resident_weight_bytes(layer) / ours / 1e9
                rows.append({"section": "cpu decode", "case": case, "kernel": kernel, "ours_ms": ours * 1e3,
                             "baseline": "fp32 nn.Linear", "baseline_ms": fp32 * 1e3, "speedup": fp32 / ours,
                             "goal": 3.0 if requested == "auto" else None, "memory_ratio": memory,
                             "gb_per_s": gb_per_s, "bandwidth_share": gb_per_s / bandwidth,
                             "bandwidth_goal": 0.5 if requested == "auto" else None,
                             "error_vs_fp16": error_vs_fp16(layer, dense, x)})
                print_row(rows[-1])
                del layer
            del dense


def cpu_fallbacks(rows: list[dict], repeats: int) -> None:
    """Each bit width's auto kernel against the reference ``torch`` kernel on a 7168x7168 layer."""
    for bits, group_size in ((4, 128), (2, 128), (3, 128), (8, -1), (8, 128)):
        layer = random_layer(bits, group_size, 7168, 7168, act_order=True)
        reference = random_layer(bits, group_size, 7168, 7168, act_order=True)
        reference.kernel = "torch"
        x = torch.randn(1, 7168, dtype=torch.float16)
        kernel = layer.select_kernel("cpu")
        ours = median_seconds(layer, x, repeats=repeats)
        slow = median_seconds(reference, x, repeats=2)
        rows.append({"section": "cpu fallback", "case": f"{bits}bit g{group_size} act 7168x7168", "kernel": kernel,
                     "ours_ms": ours * 1e3, "baseline": "torch (reference) kernel", "baseline_ms": slow * 1e3,
                     "speedup": slow / ours, "goal": 1.0})
        print_row(rows[-1])


def cpu_prefill(rows: list[dict], shapes: list[tuple[int, int]], repeats: int) -> None:
    from gptq_tools.runtime.kernels import cpu_int4, cpu_int4_native

    layer = random_layer(4, 128, 7168, 7168, act_order=True)
    layer.kernel = "cpu-int4"
    _, op_reason = try_select(layer)
    if op_reason is not None:
        rows.append({"section": "prefill threshold", "case": "7168x7168 (int4 op)", "kernel": "cpu-int4",
                     "unsupported": op_reason})
        print_row(rows[-1])
    for tokens in (4, 8, 16, 32, 64, 128) if op_reason is None else ():  # the op vs bf16 dequantize+GEMM
        flat = torch.randn(tokens, 7168).index_select(1, layer.input_perm.long()).to(torch.bfloat16)
        op = median_seconds(torch.ops.aten._weight_int4pack_mm_for_cpu, flat, layer.int4_packed,
                            layer.int4_group_size, layer.int4_scales_and_zeros, repeats=repeats)
        dequant = median_seconds(cpu_int4._dequantized_gemm, layer, flat, repeats=repeats)
        rows.append({"section": "prefill threshold", "case": f"{tokens} tokens 7168x7168 (int4 op)",
                     "kernel": "cpu-int4", "ours_ms": op * 1e3, "baseline": "bf16 dequant+GEMM path",
                     "baseline_ms": dequant * 1e3, "speedup": dequant / op, "goal": None})
        print_row(rows[-1])
    build = next((b for b in cpu_int4_native.BUILDS if not isinstance(b.library(), str)), None)
    if build is not None:
        library = build.library()
        layer = random_layer(4, 128, 7168, 7168, act_order=True)
        layer.kernel = build.name
        layer.select_kernel("cpu")
        for tokens in (32, 64, 128, 192, 256, 512):  # its row-blocked matmul vs its fp32 dequantize+GEMM path
            flat = torch.randn(tokens, 7168)
            blocked = median_seconds(cpu_int4_native._gemm, library, layer, flat, repeats=repeats)
            dequant = median_seconds(cpu_int4_native._dequantized_gemm, library, layer, flat, repeats=repeats)
            rows.append({"section": "prefill threshold", "case": f"{tokens} tokens 7168x7168 (native matmul)",
                         "kernel": build.name, "ours_ms": blocked * 1e3,
                         "baseline": "fp32 dequant+GEMM path", "baseline_ms": dequant * 1e3,
                         "speedup": dequant / blocked, "goal": None})
            print_row(rows[-1])
    del layer
    for in_features, out_features in shapes:
        dense = None
        for requested in ("auto", "cpu-int4"):
            layer = random_layer(4, 128, in_features, out_features, act_order=True)
            if dense is None:
                dense = dense_copy(layer, torch.float32)
            layer.kernel = requested
            kernel, reason = try_select(layer)
            if reason is not None:
                rows.append({"section": "cpu prefill", "case": f"4bit g128 act {in_features}x{out_features}",
                             "kernel": requested, "unsupported": reason})
                print_row(rows[-1])
                continue
            if requested != "auto" and kernel == rows[-1]["kernel"]:
                break
            for tokens in (128, 512):
                x = torch.randn(tokens, in_features)
                half = x.to(torch.float16)  # the model's dtype; the fp32 baseline gets fp32 input
                fp32 = median_seconds(dense, x, repeats=repeats)
                ours = median_seconds(layer, half, repeats=repeats)
                rows.append({"section": "cpu prefill", "kernel": kernel,
                             "case": f"{tokens} tokens 4bit g128 act {in_features}x{out_features}",
                             "ours_ms": ours * 1e3, "baseline": "fp32 nn.Linear", "baseline_ms": fp32 * 1e3,
                             "speedup": fp32 / ours, "goal": 1 / 1.3 if requested == "auto" else None,
                             "error_vs_fp16": error_vs_fp16(layer, dense, x[:16])})
                print_row(rows[-1])
            del layer
        del dense


# ------------------------------------------------------------------------------------------- GPU
def gpu_section(rows: list[dict], shapes: list[tuple[int, int]], repeats: int) -> None:
    if not torch.cuda.is_available():
        print("GPU section skipped: no CUDA device", flush=True)
        return
    sync = torch.cuda.synchronize
    for in_features, out_features in shapes:
        for group_size in (128, -1):
            layer = random_layer(4, group_size, in_features, out_features, act_order=True)
            dense = dense_copy(layer, torch.float16, device="cuda")
            for kernel in ("triton", "cuda-int4"):
                candidate = random_layer(4, group_size, in_features, out_features, act_order=True, device="cuda")
                candidate.kernel = kernel
                _, reason = try_select(candidate, "cuda")
                if reason is not None:
                    rows.append({"section": "gpu", "case": f"4bit g{group_size} act {in_features}x{out_features}",
                                 "kernel": kernel, "unsupported": reason})
                    print_row(rows[-1])
                    continue
                for batch in GPU_BATCHES:
                    x = torch.randn(batch, in_features, dtype=torch.float16, device="cuda")
                    fp16 = median_seconds(dense, x, repeats=repeats, sync=sync)
                    ours = median_seconds(candidate, x, repeats=repeats, sync=sync)
                    rows.append({"section": "gpu", "case": f"batch {batch} 4bit g{group_size} act {in_features}x"
                                 f"{out_features}", "kernel": kernel, "ours_ms": ours * 1e3,
                                 "baseline": "fp16 nn.Linear", "baseline_ms": fp16 * 1e3, "speedup": fp16 / ours,
                                 "goal": 3.0 if batch == 1 else None})
                    print_row(rows[-1])
                del candidate
            del layer, dense
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- end to end
def write_checkpoint(folder: Path) -> Path:
    """The synthetic OPT-1.3B-shaped checkpoint, with a small trained tokenizer (written once)."""
    from gptq_tools.checkpoint.model_files import QuantizeSettings
    from gptq_tools.checkpoint.tiny import tiny_corpus, train_tokenizer
    from gptq_tools.files.fileio import atomic_output
    from gptq_tools.files.safetensors_format import build_header
    from gptq_tools.runtime.plan import build_meta_model, config_from_dict, tied_names

    weights = folder / "gptq_model-4bit-128g.safetensors"
    if weights.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = config_from_dict(OPT_1B3)
    model, _, _ = build_meta_model(config, QuantizeSettings(bits=4, group_size=128, desc_act=True))
    followers = tied_names(model)
    tensors = [(n, t) for n, t in model.state_dict(keep_vars=True).items() if n not in followers]
    names = {torch.float16: "F16", torch.int32: "I32"}
    header, _ = build_header([(n, names[t.dtype], tuple(t.shape)) for n, t in tensors], metadata={"format": "pt"})
    generator = torch.Generator().manual_seed(0)
    with atomic_output(weights, force=True) as handle:
        handle.write(header)
        for name, meta in tensors:
            handle.write(synthetic_tensor(name, tuple(meta.shape), generator).numpy().tobytes())
    config.quantization_config = QUANTIZE
    config.save_pretrained(folder)
    (folder / "quantize_config.json").write_text(json.dumps(QUANTIZE), encoding="utf-8")
    train_tokenizer(tiny_corpus()[0], folder, vocab_size=2048)
    return folder


def synthetic_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith(".qweight"):
        return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, generator=generator)
    if name.endswith(".qzeros"):
        return torch.full(shape, 0x77777777, dtype=torch.int32)  # zero 8 (v1 stores 7): symmetric
    if name.endswith(".g_idx"):
        return (torch.randperm(shape[0], generator=generator) // 128).to(torch.int32)  # act-order
    if name.endswith(".scales"):
        return (torch.rand(shape, generator=generator) * 0.004 + 0.004).to(torch.float16)
    if name.endswith("layer_norm.weight"):
        return torch.ones(shape, dtype=torch.float16)
    if name.endswith(".bias") or name.endswith("layer_norm.bias"):
        return torch.zeros(shape, dtype=torch.float16)
    return (torch.randn(shape, generator=generator) * 0.05).to(torch.float16)


def child_environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "GPTQ_TOOLS_DISABLE_PROGRESS": "1",
            "PYTHONPATH": str(REPO_ROOT)}


def run_generate(folder: Path, kernel: str, new_tokens: int) -> tuple[list[int], str, float, list[str]]:
    """``gptq-tools -v generate`` in a fresh process: (new token ids, text, tokens/s, the kernel log lines).

    The ids are compared, not the text: the synthetic model's vocabulary is larger than its small tokenizer's,
    so most ids decode to nothing."""
    command = [sys.executable, "-m", "gptq_tools", "-v", "generate", str(folder), "--prompt", PROMPT,
               "--max-new-tokens", str(new_tokens), "--dtype", "float32", "--kernel", kernel, "--no-verify"]
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment(), check=False)
    if done.returncode:
        raise SystemExit(f"generate failed ({done.returncode}):\n{done.stderr[-3000:]}")
    speed = re.search(r"\[(\d+) tokens in ([\d.]+) s, ([\d.]+) tokens/s\]", done.stderr)
    kernels = [line.split("kernel: ", 1)[1] for line in done.stderr.splitlines() if "kernel: " in line]
    ids = next((line.split("new token ids:", 1)[1].split() for line in done.stderr.splitlines()
                if "new token ids:" in line), None)
    if ids is None:
        raise SystemExit(f"generate printed no 'new token ids:' line:\n{done.stderr[-3000:]}")
    return [int(i) for i in ids], done.stdout.strip(), float(speed.group(3)) if speed else 0.0, kernels


def fp32_child(folder: str, new_tokens: int) -> None:
    """transformers, fp32, the dequantized weights: greedy text and tokens/s as JSON (a fresh process)."""
    from gptq_tools.runtime.generate import load_tokenizer
    from gptq_tools.runtime.load import load_quantized

    torch.set_num_threads(THREADS)
    model = load_quantized(folder, dtype=torch.float32, kernel="torch", verify_hash=False)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = torch.nn.Parameter(module.dequantize_weight(torch.float32), requires_grad=False)
            if module.bias is not None:
                linear.bias = torch.nn.Parameter(module.bias.float(), requires_grad=False)
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, linear)
    tokenizer = load_tokenizer(folder)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        started = time.perf_counter()
        output = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - started
    new = output[0, ids.shape[1]:]
    print(json.dumps({"text": PROMPT + tokenizer.decode(new, skip_special_tokens=True), "ids": new.tolist(),
                      "tokens_per_second": new.numel() / seconds}))


def agreement_child(folder: str, reference_ids: str) -> None:
    """Teacher-forced on the reference kernel's greedy tokens: at each step, does ``kernel="auto"`` pick the same
    token, and where not, how far apart were the reference's top two logits (a near-tie) against the largest
    logit difference between the two kernels there. JSON, one entry per step."""
    from gptq_tools.runtime.generate import load_tokenizer
    from gptq_tools.runtime.load import load_quantized

    torch.set_num_threads(THREADS)
    forced = [int(i) for i in reference_ids.split(",")]
    prompt = load_tokenizer(folder)(PROMPT, return_tensors="pt")["input_ids"]
    sequence = torch.cat([prompt, torch.tensor([forced[:-1]])], dim=1)
    steps = slice(prompt.shape[1] - 1, sequence.shape[1])
    logits = {}
    for kernel in ("auto", "torch"):
        model = load_quantized(folder, dtype=torch.float32, kernel=kernel, verify_hash=False)
        with torch.inference_mode():
            logits[kernel] = model(sequence).logits[0, steps].float()
        del model
    rows = []
    for ours, reference in zip(logits["auto"], logits["torch"]):
        top = reference.topk(2).values
        rows.append({"equal": int(ours.argmax()) == int(reference.argmax()), "margin": float(top[0] - top[1]),
                     "max_diff": float((ours - reference).abs().max()), "logit_scale": float(reference.abs().max())})
    print(json.dumps(rows))


def memory_child(folder: str) -> None:
    """Resident bytes of the quantized linears after an auto load vs their checkpoint bytes, as JSON."""
    from gptq_tools.checkpoint.model_files import find_checkpoint_files
    from gptq_tools.runtime.load import load_quantized

    before = rss_parts()
    model = load_quantized(folder, dtype=torch.float32, verify_hash=False)
    after = rss_parts()
    held = sum(held_bytes(m) for m in model.modules() if isinstance(m, QuantLinear))
    names = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QuantLinear)
             for b in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    packed = sum(e.nbytes for n, e in find_checkpoint_files(Path(folder)).entries.items() if n in names)
    print(json.dumps({"held": held, "packed": packed, "file_bytes": sum(p.stat().st_size for p in Path(folder).glob(
        "*.safetensors")), **{f"{key}_growth": after[key] - before[key] for key in after}}))


def rss_parts() -> dict[str, int]:
    """RssAnon / RssFile of this process in bytes (/proc/self/status; zeros where unreadable)."""
    parts = {"RssAnon": 0, "RssFile": 0}
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in parts:
                    parts[key] = int(value.split()[0]) * 1024
    except OSError:  # no /proc (not Linux): the memory rows then read 0 rather than stopping the benchmark
        pass
    return parts


def in_child(function: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", function, *args], capture_output=True, text=True,
                          env=child_environment(), check=False)
    if done.returncode:
        raise SystemExit(f"{function} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def end_to_end(rows: list[dict], results: dict) -> None:
    folder = write_checkpoint(OUT / "opt-1.3b-4bit")
    ids, text, ours, kernels = run_generate(folder, "auto", NEW_TOKENS)
    bf16_ids, _, bf16_speed, _ = run_generate(folder, "cpu-int4", NEW_TOKENS)  # PyTorch's bf16 op, to compare
    baseline = in_child("fp32", str(folder), str(NEW_TOKENS))
    reference_ids, _, _, _ = run_generate(folder, "torch", REFERENCE_TOKENS)
    memory = in_child("memory", str(folder))
    prefix_equal = ids[:REFERENCE_TOKENS] == reference_ids and len(reference_ids) == REFERENCE_TOKENS
    agreement = in_child("agreement", str(folder), ",".join(map(str, reference_ids)))
    # a step passes when the kernels pick the same token, or when the reference itself was a near-tie: its top
    # two logits closer than the largest logit difference the bf16 kernel makes there
    near_ties_only = all(step["equal"] or step["margin"] <= step["max_diff"] for step in agreement)
    results["end_to_end"] = {"ours_ids": ids, "fp32_ids": baseline["ids"], "reference_ids": reference_ids,
                             "ours_text": text, "kernels": kernels, "equal_to_reference": prefix_equal,
                             "teacher_forced": agreement, "differs_only_at_near_ties": near_ties_only,
                             "equal_to_fp32": ids == baseline["ids"], "cpu_int4_ids": bf16_ids,
                             "cpu_int4_equal_to_fp32": bf16_ids == baseline["ids"], **memory}
    rows.append({"section": "end to end", "case": f"OPT-1.3B shape, {NEW_TOKENS} new tokens (tokens/s)",
                 "kernel": "; ".join(kernels), "ours_ms": 1e3 / ours, "baseline": "transformers fp32",
                 "baseline_ms": 1e3 / baseline["tokens_per_second"], "speedup": ours / baseline["tokens_per_second"],
                 "goal": 1.5})
    print_row(rows[-1])
    rows.append({"section": "end to end", "case": f"OPT-1.3B shape, {NEW_TOKENS} new tokens (tokens/s)",
                 "kernel": "cpu-int4", "ours_ms": 1e3 / bf16_speed, "baseline": "transformers fp32",
                 "baseline_ms": 1e3 / baseline["tokens_per_second"],
                 "speedup": bf16_speed / baseline["tokens_per_second"], "goal": None})
    print_row(rows[-1])
    rows.append({"section": "memory", "case": "OPT-1.3B resident quantized-linear bytes / checkpoint bytes",
                 "kernel": "auto", "ours_ms": None, "baseline": "packed bytes", "baseline_ms": None,
                 "speedup": None, "goal": None, "memory_ratio": memory["held"] / memory["packed"]})
    print_row(rows[-1])
    same = sum(a == b for a, b in zip(ids, baseline["ids"]))
    bf16_same = sum(a == b for a, b in zip(bf16_ids, baseline["ids"]))
    print(f"greedy ids, auto kernels : {ids}\ngreedy ids, fp32 model   : {baseline['ids']} ({same}/{len(ids)} equal)\n"
          f"greedy ids, cpu-int4     : {bf16_ids} ({bf16_same}/{len(ids)} equal to the fp32 model's)\n"
          f"greedy ids, torch kernel : {reference_ids} ({REFERENCE_TOKENS} tokens; auto starts with them: "
          f"{prefix_equal})", flush=True)
    for number, step in enumerate(agreement, 1):
        print(f"  teacher-forced step {number}: same token {step['equal']}; reference top-2 margin "
              f"{step['margin']:.4f}, largest logit difference {step['max_diff']:.4f} (logits up to "
              f"{step['logit_scale']:.2f})", flush=True)


# ------------------------------------------------------------------------------------------ output
def print_row(row: dict) -> None:
    if row.get("unsupported"):
        print(f"{row['section']:17s} {row['case']:52s} {row['kernel']:18s} unsupported: {row['unsupported']}",
              flush=True)
        return
    speed = f"{row['speedup']:.2f}x" if row.get("speedup") is not None else "-"
    goal = row.get("goal")
    met = "" if goal is None or row.get("speedup") is None else ("  ok" if row["speedup"] >= goal else "  MISSED")
    memory = f"  mem {row['memory_ratio']:.3f}x" if row.get("memory_ratio") is not None else ""
    if row.get("error_vs_fp16") is not None:
        memory += f"  err {row['error_vs_fp16']:.3g}x fp16 rounding"
    if row.get("gb_per_s") is not None:
        share_met = "" if row.get("bandwidth_goal") is None else (
            " ok" if row["bandwidth_share"] >= row["bandwidth_goal"] else " MISSED")
        memory += f"  {row['gb_per_s']:.1f} GB/s = {row['bandwidth_share']:.0%} of read bandwidth{share_met}"
    times = "" if row.get("ours_ms") is None else f"{row['ours_ms']:9.2f} ms vs {row['baseline_ms']:9.2f} ms"
    print(f"{row['section']:17s} {row['case']:52s} {row['kernel'][:60]:18s} {times} {speed:>7s}{met}{memory}",
          flush=True)


def missed(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        if row.get("goal") is not None and row.get("speedup") is not None and row["speedup"] < row["goal"]:
            out.append(f"{row['section']} {row['case']}: {row['speedup']:.2f}x < {row['goal']:.2f}x")
        if row.get("bandwidth_goal") is not None and row["bandwidth_share"] < row["bandwidth_goal"]:
            out.append(f"{row['section']} {row['case']}: {row['bandwidth_share']:.0%} of read bandwidth < "
                       f"{row['bandwidth_goal']:.0%}")
        if row.get("memory_ratio") is not None and row["memory_ratio"] > 1.1:
            out.append(f"{row['section']} {row['case']}: memory {row['memory_ratio']:.3f}x > 1.1x")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="OPT-30B 7168x7168 only, no end-to-end run")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per case (median; default 5)")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU rows (make gpu-check)")
    parser.add_argument("--decode-only", action="store_true", help="only the CPU (and GPU) decode rows")
    parser.add_argument("--shapes", help="decode shapes IN:OUT[,IN:OUT...] instead of the default ones "
                        "(e.g. 7168:7168,14336:57344, the issue's two)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        {"fp32": lambda: fp32_child(args.child[1], int(args.child[2])),
         "agreement": lambda: agreement_child(args.child[1], args.child[2]),
         "memory": lambda: memory_child(args.child[1])}[args.child[0]]()
        return 0
    torch.set_num_threads(THREADS)
    OUT.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    results: dict = {"threads": THREADS, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}
    decode_shapes = DECODE_SHAPES[:1] if args.quick else DECODE_SHAPES
    if args.shapes:
        try:
            decode_shapes = [(int(a), int(b)) for a, b in (item.split(":") for item in args.shapes.split(","))]
        except ValueError:
            parser.error(f"--shapes {args.shapes!r}: write IN:OUT pairs separated by commas, e.g. 7168:7168")
    prefill_shapes = PREFILL_SHAPES[:1] if args.quick else PREFILL_SHAPES
    print(f"torch {torch.__version__}, {THREADS} threads, CPU {results['cpu']}; medians of {args.repeats}", flush=True)
    if not args.gpu_only:
        results["read_bandwidth_gb_s"] = bandwidth = read_bandwidth(THREADS)
        print(f"read bandwidth ({THREADS} threads, 512 MiB sum): {bandwidth:.1f} GB/s", flush=True)
        cpu_decode(rows, decode_shapes, args.repeats, bandwidth)
        if not args.decode_only:
            cpu_fallbacks(rows, args.repeats)
            cpu_prefill(rows, prefill_shapes, max(3, args.repeats // 2))
    gpu_section(rows, decode_shapes, args.repeats * 4)
    if not args.quick and not args.gpu_only and not args.decode_only:
        end_to_end(rows, results)
    results["rows"] = rows
    failures = missed(rows)
    if "end_to_end" in results and not results["end_to_end"]["equal_to_reference"]:
        failures.append("end to end: greedy tokens differ from the reference kernel's"
                        + ("" if results["end_to_end"]["differs_only_at_near_ties"] else " (not only at near-ties)"))
    results["missed"] = failures
    (OUT / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print("\n".join(["goals missed:", *failures]) if failures else "all goals met", flush=True)
    print(f"results: {OUT / 'results.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
