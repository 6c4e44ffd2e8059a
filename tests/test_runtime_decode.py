"""CPU decode tuning (gptq_tools.runtime.decode): fp16-stored fp32 linears, PyTorch's ops on one thread in a
decode step with the native kernel on the caller's count, and results equal to the untuned model's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gptq_tools.runtime import decode
from gptq_tools.runtime.kernels import cpu_half, cpu_int4_native
from gptq_tools.runtime.load import load_quantized
from gptq_tools.runtime.qlinear import QuantLinear

from .tiny_gptq import build_tiny_checkpoint, reference_model

FOUND = cpu_int4_native.first_library()
needs_native = pytest.mark.skipif(FOUND is None, reason="no build of the native kernel runs here")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


@needs_native
@pytest.mark.parametrize("tokens", [1, 3, cpu_half.NATIVE_TOKENS, cpu_half.NATIVE_TOKENS + 1, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_half_stored_linear_is_the_fp32_layer(tokens: int, bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths (native GEMV, converted blocks) give the fp32 layer's result to fp32 rounding, for fp16
    values of every kind (subnormals, the largest normals) and a width that is no whole number of vectors."""
    monkeypatch.setattr(cpu_int4_native, "THREAD_MIN_ELEMENTS", 0)  # the GEMV's rows split across threads
    monkeypatch.setattr(cpu_half, "BLOCK_ELEMENTS", 4096)  # several blocks on the prefill path
    generator = torch.Generator().manual_seed(tokens)
    layer = nn.Linear(203, 150, bias=bias)
    with torch.no_grad():
        weight = torch.randn(150, 203, generator=generator).half()
        weight[0, :10] = torch.tensor([6e-8, -6e-8, 1e-5, -3e-5, 65504, -65504, 0.0, -0.0, 2**-14, 1.0]).half()
        layer.weight.copy_(weight.float())
    assert cpu_half.exactly_fp16(layer.weight)
    half = cpu_half.HalfStoredLinear(layer, FOUND[1])
    assert half.weight_bits.dtype == torch.int16 and torch.equal(half.weight, layer.weight)
    x = torch.randn(2, tokens, 203, generator=generator)
    with torch.no_grad():
        expected = layer(x)
        got = half(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert relative_error(got, expected) <= 2e-6


def test_exactly_fp16_refuses_values_fp16_would_round() -> None:
    assert cpu_half.exactly_fp16(torch.tensor([1.0, 0.5, 65504.0]))
    assert not cpu_half.exactly_fp16(torch.tensor([1.0, 1.0 + 2**-20]))
    assert not cpu_half.exactly_fp16(torch.tensor([1.0], dtype=torch.float16))  # not an fp32 layer


@needs_native
@pytest.mark.parametrize("model_type", ["opt", "bloom"])
def test_decode_tuning_keeps_results_and_restores_threads(model_type: str, tmp_path: Path) -> None:
    """An untied lm_head is kept in fp16; a decode step runs PyTorch's ops on one thread and the native kernel on
    the caller's count; prefill does not; the logits are the reference model's; threads come back after a
    step, also after one that raised."""
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", model_type, tie=False, desc_act=True)
    model = load_quantized(checkpoint.folder, dtype=torch.float32, device_map="cpu")
    assert isinstance(model.get_output_embeddings(), cpu_half.HalfStoredLinear)
    # the tiny builder gives each linear its own act-order permutation: linears that read one input in different
    # orders cannot share a call
    assert all(m.native_shared is None for m in model.modules() if isinstance(m, QuantLinear))
    seen: list[tuple[int, int]] = []
    first_block = next(m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block")))
    first_block.register_forward_pre_hook(lambda *_: seen.append((torch.get_num_threads(),
                                                                  cpu_int4_native.pool_threads())))
    reference = reference_model(checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prompt = torch.tensor([[4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68]])  # 17 tokens
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            step = model(torch.tensor([[5]]), past_key_values=out.past_key_values, use_cache=True)
            expected = reference(torch.cat([prompt, torch.tensor([[5]])], dim=1)).logits[:, -1]
        assert seen == [(2, 2), (1, 2)]  # prefill untouched; the decode step on one thread, the kernel on two
        assert torch.get_num_threads() == 2 and cpu_int4_native.pool_threads() == 2
        assert relative_error(step.logits[:, -1], expected) < 1e-5
        with pytest.raises(IndexError):  # a token id beyond the vocabulary fails inside the step
            model(torch.tensor([[10_000]]))
        assert torch.get_num_threads() == 2 and cpu_int4_native._pool_threads is None
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_tied_lm_head_stays_as_it_is(tmp_path: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "bloom", tie=True)
    model = load_quantized(checkpoint.folder, dtype=torch.float32, device_map="cpu")
    assert type(model.get_output_embeddings()) is nn.Linear
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_decode_threads_nest(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with decode.decode_threads():
            with decode.decode_threads():
                assert torch.get_num_threads() == 1 and cpu_int4_native.pool_threads() == 3
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3 and cpu_int4_native._pool_threads is None
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("tokens", [1, 3, cpu_int4_native.PREFILL_TOKENS])
def test_linears_sharing_an_input_give_their_own_bits(tokens: int, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """q, k and v (and the MLP's pair where an architecture has one) share one native call; every output is
    bit for bit what the layer's own call gives, on the decode path, the multi-row path and the prefill path
    (whose parameters are then columns of the group's wider ones), asked for in any order."""
    monkeypatch.setattr(cpu_int4_native, "THREAD_MIN_ELEMENTS", 0)
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", group_size=16)  # one input order
    model = load_quantized(checkpoint.folder, dtype=torch.float32, device_map="cpu")
    attention = model.model.decoder.layers[1].self_attn
    members = [attention.q_proj, attention.k_proj, attention.v_proj]
    shared = members[0].native_shared
    assert shared is not None and all(m.native_shared is shared for m in members)
    assert members[1].native_scales.stride(0) == shared.width > members[1].native_scales.shape[1]
    x = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        together = [attention.v_proj(x), attention.q_proj(x), attention.k_proj(x)]
        for member in members:
            member.native_shared = None
        alone = [attention.v_proj(x), attention.q_proj(x), attention.k_proj(x)]
        for member in members:
            member.native_shared = shared
        x.add_(1.0)  # changed in place: nothing kept from before may be returned
        after = attention.k_proj(x)
        for member in members:
            member.native_shared = None
        assert torch.equal(after, attention.k_proj(x))
        for member in members:
            member.native_shared = shared
    with torch.inference_mode():  # inference tensors have no version counter: each member computes its own
        y = x.clone()
        assert all(torch.equal(member(y), alone_member) for member, alone_member in zip(
            members, [attention.q_proj(y), attention.k_proj(y), attention.v_proj(y)]))
        assert shared._input is not y
    assert all(torch.equal(a, b) for a, b in zip(together, alone))


@needs_native
def test_greedy_generation_with_shared_calls_matches_reference(tmp_path: Path) -> None:
    """End to end through transformers' generate: q, k and v share calls, and the tokens are the reference's."""
    checkpoint = build_tiny_checkpoint(tmp_path / "ckpt", "opt", tie=False)
    model = load_quantized(checkpoint.folder, dtype=torch.float32, device_map="cpu")
    assert model.model.decoder.layers[0].self_attn.q_proj.native_shared is not None
    prompt = torch.tensor([[4, 8, 12, 16]])
    options = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": 12, "do_sample": False}
    with torch.no_grad():
        got = model.generate(prompt, **options)
        expected = reference_model(checkpoint).generate(prompt, **options)
    assert torch.equal(got, expected)
