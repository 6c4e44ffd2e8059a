"""Builds tiny GPTQ checkpoints for the loader tests, independent of the quantizer.

A random-init OPT or BLOOM from a small transformers config; every target linear (from the
architecture table) is quantized by round-to-nearest, packed with ``gptq_tools.checkpoint.packing`` and written as
AutoGPTQ does (v1 ``gptq`` or v2 ``gptq_v2`` zero points, act-order with a random ``g_idx``, with or
without ``lm_head.weight``), as one file, shards with an index, or split parts. The float reference
state dict (same fp16 tensors, quantized linears dequantized) comes back with it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptq_tools.checkpoint.architectures import get_arch
from gptq_tools.checkpoint.packing import dequantize, pack_qweight, pack_qzeros
from gptq_tools.runtime.qlinear import QuantLinear


def random_quant_tensors(bits: int, group_size: int, *, in_features: int, out_features: int, act_order: bool,
                         checkpoint_format: str, sym: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """One layer's random integer weights, zeros (``2**(bits-1)`` when ``sym``) and fp16 scales, a random
    ``g_idx`` with ``act_order``, and a bias, packed as a checkpoint holds them."""
    generator = torch.Generator().manual_seed(seed)
    size = group_size if group_size > 0 else in_features
    groups = -(-in_features // size)
    intweight = torch.randint(0, 2**bits, (in_features, out_features), generator=generator)
    if sym:
        zeros = torch.full((groups, out_features), 2 ** (bits - 1))
    else:  # v1 stores zero - 1, so a v1 zero of 0 cannot be written
        zeros = torch.randint(1 if checkpoint_format == "gptq" else 0, 2**bits, (groups, out_features),
                              generator=generator)
    scales = (torch.rand(groups, out_features, generator=generator) * 0.02 + 0.001).to(torch.float16)
    g_idx = torch.arange(in_features) // size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    return {"qweight": pack_qweight(intweight, bits),
            "qzeros": pack_qzeros(zeros, bits, checkpoint_format=checkpoint_format),
            "scales": scales, "g_idx": g_idx.to(torch.int32),
            "bias": (torch.randn(out_features, generator=generator) * 0.1).to(torch.float16)}


def quant_layer(tensors: dict[str, torch.Tensor], bits: int, group_size: int, *, checkpoint_format: str,
                kernel: str = "torch", bias: bool = True, dtype: torch.dtype = torch.float16) -> QuantLinear:
    """A prepared QuantLinear holding ``tensors`` (from :func:`random_quant_tensors`)."""
    in_features, out_features = tensors["g_idx"].shape[0], tensors["scales"].shape[1]
    layer = QuantLinear(bits, group_size, in_features, out_features, bias=bias, checkpoint_format=checkpoint_format,
                        dtype=dtype, kernel=kernel)
    layer.name = "model.layers.0.fc1"
    for name in ("qweight", "qzeros", "scales", "g_idx") + (("bias",) if bias else ()):
        getattr(layer, name).copy_(tensors[name])
    layer.prepare()
    return layer


@dataclass(frozen=True)
class TinyCheckpoint:
    folder: Path
    config: object
    reference_state: dict[str, torch.Tensor]  # float32, quantized linears dequantized
    weight_name: str  # the (joined) safetensors file name
    sha256: str  # of the (joined) safetensors file


def tiny_config(model_type: str, *, tie: bool = True, hidden: int = 64, layers: int = 2, vocab: int = 96) -> object:
    from transformers import BloomConfig, OPTConfig

    if model_type == "opt":
        return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden, num_attention_heads=4,
                         vocab_size=vocab, max_position_embeddings=128, word_embed_proj_dim=hidden,
                         tie_word_embeddings=tie, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    if model_type == "bloom":
        return BloomConfig(hidden_size=hidden, n_layer=layers, n_head=4, vocab_size=vocab, tie_word_embeddings=tie,
                           pad_token_id=1, bos_token_id=2, eos_token_id=2)
    if model_type == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=2 * hidden,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                           max_position_embeddings=128, tie_word_embeddings=tie, pad_token_id=1, bos_token_id=2,
                           eos_token_id=2)
    raise ValueError(model_type)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, g_idx: torch.Tensor, *,
                 sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of ``weight`` (out, in) per group given by ``g_idx``: (intweight (in, out), zeros, scales)."""
    out_features, in_features = weight.shape
    groups = math.ceil(in_features / (group_size if group_size > 0 else in_features))
    maxq = 2**bits - 1
    zeros = torch.empty(groups, out_features, dtype=torch.int64)
    scales = torch.empty(groups, out_features, dtype=torch.float16)
    intweight = torch.empty(in_features, out_features, dtype=torch.int64)
    for group in range(groups):
        columns = (g_idx == group).nonzero().flatten()
        block = weight[:, columns].float()  # (out, members)
        low, high = block.min(dim=1).values.clamp(max=0), block.max(dim=1).values.clamp(min=0)
        if sym:
            scale = torch.maximum(low.abs(), high) * 2 / maxq
            zero = torch.full_like(scale, (maxq + 1) // 2)
        else:
            scale = (high - low) / maxq
            zero = torch.round(-low / scale.clamp(min=1e-8))
        scale = scale.clamp(min=1e-5).to(torch.float16)
        q = torch.clamp(torch.round(block / scale.float()[:, None]) + zero[:, None], 0, maxq)
        intweight[columns] = q.t().to(torch.int64)
        zeros[group], scales[group] = zero.to(torch.int64), scale
    return intweight, zeros, scales


def build_tiny_checkpoint(folder: Path, model_type: str = "opt", *, bits: int = 4, group_size: int = 32,
                          desc_act: bool = False, checkpoint_format: str = "gptq", sym: bool = True,
                          tie: bool = True, with_lm_head: bool = True, layout: str = "single",
                          seed: int = 0, layers: int = 2) -> TinyCheckpoint:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, tie=tie, layers=layers)
    model = AutoModelForCausalLM.from_config(config).eval()
    arch = get_arch(model_type)
    state = {name: tensor.detach().to(torch.float16).clone() for name, tensor in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(seed + 1)
    quantized = {f"{arch.layers_path}.{i}.{name}" for i in range(layers) for name in arch.quantized_linears}
    for name, value in state.items():
        module = name.rpartition(".")[0]
        if module in quantized and name.endswith(".weight"):
            in_features = value.shape[1]
            g_idx = torch.arange(in_features) // (group_size if group_size > 0 else in_features)
            if desc_act:
                g_idx = g_idx[torch.randperm(in_features, generator=generator)]
            intweight, zeros, scales = rtn_quantize(value, bits, group_size, g_idx, sym=sym)
            packed = {"qweight": pack_qweight(intweight, bits),
                      "qzeros": pack_qzeros(zeros, bits, checkpoint_format=checkpoint_format),
                      "scales": scales, "g_idx": g_idx.to(torch.int32)}
            tensors.update({f"{module}.{key}": tensor for key, tensor in packed.items()})
            reference[name] = dequantize(packed["qweight"], packed["qzeros"], scales, packed["g_idx"], bits=bits,
                                         checkpoint_format=checkpoint_format, dtype=torch.float32)
            continue
        reference[name] = value.float()
        if name == arch.lm_head + ".weight" and not with_lm_head:
            continue
        tensors[name] = value
    folder.mkdir(parents=True, exist_ok=True)
    quantize_config = {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
                       "quant_method": "gptq", "checkpoint_format": checkpoint_format, "damp_percent": 0.01}
    config.quantization_config = quantize_config
    config.save_pretrained(folder)
    (folder / "quantize_config.json").write_text(json.dumps(quantize_config), encoding="utf-8")
    weight_name = f"gptq_model-{bits}bit-{group_size}g.safetensors"
    sha = _write_weights(folder, weight_name, tensors, layout)
    return TinyCheckpoint(folder, config, reference, weight_name, sha)


def _write_weights(folder: Path, weight_name: str, tensors: dict[str, torch.Tensor], layout: str) -> str:
    tensors = {name: tensor.contiguous().clone() for name, tensor in tensors.items()}  # no shared storage
    if layout == "sharded":
        names = sorted(tensors)
        halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for shard, shard_names in halves.items():
            save_file({n: tensors[n] for n in shard_names}, str(folder / shard), metadata={"format": "pt"})
        weight_map = {n: shard for shard, shard_names in halves.items() for n in shard_names}
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
        return ""
    target = folder / weight_name
    save_file(tensors, str(target), metadata={"format": "pt"})
    data = target.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if layout == "parts":
        target.unlink()
        stem = weight_name.removesuffix(".safetensors")
        cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
        for letter, (begin, end) in zip("abc", itertools.pairwise(cut)):
            (folder / f"{stem}.JOINBEFOREUSE.split-{letter}.safetensors").write_bytes(data[begin:end])
    return sha


def reference_model(checkpoint: TinyCheckpoint) -> torch.nn.Module:
    """A float32 model holding the checkpoint's weights, quantized linears dequantized."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(checkpoint.config).float().eval()
    model.load_state_dict(checkpoint.reference_state)
    return model
