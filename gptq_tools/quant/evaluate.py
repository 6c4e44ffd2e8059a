"""Perplexity of a model folder, fp16 or GPTQ (dequantized on load): the quality benchmark's yardstick.

A GPTQ folder is read through its own checkpoint tensors (``qweight``/``qzeros``/``scales``/``g_idx``
are dequantized with :func:`gptq_tools.checkpoint.packing.dequantize`), so the number measures exactly what the
checkpoint stores, whoever wrote it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..checkpoint.config_check import validate_model_config
from ..checkpoint.packing import dequantize
from ..errors import CheckpointError, UsageError

QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def _checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a folder (fp16 model or GPTQ checkpoint), found as the loader finds them."""
    from ..checkpoint.model_files import find_checkpoint_files

    found = find_checkpoint_files(folder)
    if any(wf.is_parts for wf in found.files):
        raise CheckpointError(f"{folder}: weights are split parts; join them first (gptq-tools join)")
    return [wf.paths[0] for wf in found.files]


def _read_state_dict(folder: Path, quant: dict | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in _checkpoint_files(folder):
        tensors.update(load_file(str(path)))
    if quant is None:
        return {k: v.float() for k, v in tensors.items()}
    fmt = quant.get("checkpoint_format", "gptq")
    state = {k: v.float() for k, v in tensors.items() if not k.endswith(QUANT_SUFFIXES)}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        base = key[: -len(".qweight")]
        g_idx = tensors.get(f"{base}.g_idx")
        if g_idx is None:
            rows = tensors[key].shape[0] * 32 // quant["bits"]
            group = rows if quant["group_size"] == -1 else quant["group_size"]
            g_idx = torch.arange(rows, dtype=torch.int32) // group
        state[f"{base}.weight"] = dequantize(tensors[key], tensors[f"{base}.qzeros"], tensors[f"{base}.scales"], g_idx,
                                             bits=quant["bits"], checkpoint_format=fmt, dtype=torch.float32)
    return state


def load_for_eval(folder: str | Path) -> torch.nn.Module:
    """Load a model folder on CPU in fp32; GPTQ weights are dequantized from the checkpoint tensors.

    Raises:
        CheckpointError: tensors are missing or do not match the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    validate_model_config(raw, source=str(folder / "config.json"))  # refuses remote code before transformers sees it
    quant = raw.get("quantization_config")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    state = _read_state_dict(folder, quant)
    own = model.state_dict()
    if "embed_out.weight" in state and "embed_out.weight" not in own:  # GPT-NeoX head, renamed in transformers 5
        state["lm_head.weight"] = state.pop("embed_out.weight")
    for name, tensor in state.items():  # Conv1D (GPT-2) keeps weights as (in, out)
        if name in own and own[name].shape != tensor.shape and own[name].shape == tensor.t().shape:
            state[name] = tensor.t().contiguous()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (m.endswith("lm_head.weight") and tied)]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: tensors do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    if "lm_head.weight" in state:  # checkpoints write lm_head even when tied; use it as stored
        model.get_output_embeddings().weight = torch.nn.Parameter(state["lm_head.weight"])
    return model.eval()


def perplexity(model: torch.nn.Module, ids: torch.Tensor, *, seqlen: int) -> float:
    """Perplexity over non-overlapping windows of ``seqlen`` tokens of ``ids`` (1-D).

    Raises:
        UsageError: fewer than ``seqlen`` tokens.
    """
    windows = ids.numel() // seqlen
    if windows == 0:
        raise UsageError(f"need at least {seqlen} tokens for perplexity, got {ids.numel()}")
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows * seqlen, seqlen):
            batch = ids[start:start + seqlen].unsqueeze(0)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            total += float(loss) * (seqlen - 1)
            count += seqlen - 1
    return math.exp(total / count)


def log_probs(model: torch.nn.Module, ids: torch.Tensor, *, seqlen: int) -> list[torch.Tensor]:
    """Next-token log-probabilities (seqlen, vocab) per non-overlapping window of ``ids`` (1-D)."""
    windows = ids.numel() // seqlen
    if windows == 0:
        raise UsageError(f"need at least {seqlen} tokens, got {ids.numel()}")
    out = []
    with torch.no_grad():
        for start in range(0, windows * seqlen, seqlen):
            logits = model(input_ids=ids[start:start + seqlen].unsqueeze(0), use_cache=False).logits[0]
            out.append(torch.log_softmax(logits.float(), dim=-1))  # (seqlen, vocab)
    return out


def compare_to_reference(model: torch.nn.Module, ids: torch.Tensor, reference: list[torch.Tensor], *,
                         seqlen: int) -> tuple[float, float]:
    """(perplexity, mean KL(reference || model) per token) over the same windows as :func:`log_probs`.

    The KL divergence from the fp16 model's next-token distribution is far more sensitive than perplexity
    on small models, where 4-bit noise moves perplexity by hundredths of a percent.
    """
    total_nll, total_kl, count = 0.0, 0.0, 0
    for window, ref in zip(log_probs(model, ids, seqlen=seqlen), reference):
        start = count // (seqlen - 1) * seqlen
        targets = ids[start + 1:start + seqlen]
        total_nll -= float(window[:-1].gather(1, targets.unsqueeze(1)).sum())
        total_kl += float((ref.exp() * (ref - window)).sum(-1)[:-1].sum())
        count += seqlen - 1
    return math.exp(total_nll / count), total_kl / count


def folder_perplexity(folder: str | Path, text: str, *, seqlen: int, max_tokens: int | None = None) -> float:
    """Perplexity of the model in ``folder`` on ``text`` (tokenized with the folder's tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return perplexity(load_for_eval(folder), ids, seqlen=seqlen)
