"""The GPTQ solver against a plain per-column reference, RTN, packing round trips and bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from gptq_tools.checkpoint.packing import (
    dequantize,
    pack_qweight,
    pack_qzeros,
    unpack_qzeros,
    unpack_rows,
)
from gptq_tools.errors import QuantizationError, UsageError
from gptq_tools.quant.config import QuantizeConfig
from gptq_tools.quant.gptq import (
    CholeskyFailure,
    HessianAccumulator,
    find_params,
    gptq_quantize,
    gptq_reference,
)
from gptq_tools.quant.rtn import rtn_quantize


def _problem(out: int = 48, inp: int = 64, *, seed: int = 0,
             dead: tuple[int, ...] = (3,)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=generator)
    X = torch.randn(1500, inp, generator=generator) @ torch.randn(inp, inp, generator=generator) * 0.3
    X[:, list(dead)] = 0
    accumulator = HessianAccumulator(inp)
    accumulator.add(X[:700])
    accumulator.add(X[700:].reshape(8, 100, inp))
    return W, accumulator.hessian()


SETTINGS = [
    {"bits": 4, "group_size": -1, "desc_act": False},
    {"bits": 4, "group_size": 16, "desc_act": True, "static_groups": False},
    {"bits": 4, "group_size": 16, "desc_act": True, "static_groups": True},
    {"bits": 3, "group_size": 32, "desc_act": True, "sym": False},
    {"bits": 2, "group_size": 8, "desc_act": False, "sym": False, "checkpoint_format": "gptq_v2"},
    {"bits": 8, "group_size": -1, "desc_act": True},
    {"bits": 4, "group_size": 32, "desc_act": False, "block_size": 24},  # groups straddle lazy blocks
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_blocked_solver_equals_per_column_reference(settings: dict) -> None:
    config = QuantizeConfig(**{"block_size": 20, **settings})
    W, H = _problem()
    fast = gptq_quantize(W, H, config)
    slow = gptq_reference(W, H, config)
    # equal up to float rounding: the two orders of summation may flip a rare tie by one grid step
    assert (fast.intweight != slow.intweight).float().mean() <= 0.002
    assert (fast.zeros != slow.zeros).float().mean() <= 0.002
    assert torch.allclose(fast.scales.float(), slow.scales.float(), rtol=2e-3)
    assert torch.equal(fast.g_idx, slow.g_idx)
    assert fast.error == pytest.approx(slow.error, rel=1e-3)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_gptq_beats_rtn_and_packs_exactly(settings: dict) -> None:
    config = QuantizeConfig(**settings)
    W, H = _problem(out=64, seed=1)
    result = gptq_quantize(W, H, config)
    rtn = rtn_quantize(W, config, H=H)
    assert result.error < rtn.error
    maxq = 2**config.bits - 1
    assert int(result.intweight.min()) >= 0 and int(result.intweight.max()) <= maxq
    # the checkpoint tensors reconstruct exactly the weight the solver fed back
    qweight = pack_qweight(result.intweight.t().contiguous(), config.bits)
    qzeros = pack_qzeros(result.zeros, config.bits, checkpoint_format=config.checkpoint_format)
    assert torch.equal(unpack_rows(qweight, config.bits, W.shape[1]).t(), result.intweight)
    assert torch.equal(unpack_qzeros(qzeros, config.bits, W.shape[0], checkpoint_format=config.checkpoint_format),
                       result.zeros)
    rebuilt = dequantize(qweight, qzeros, result.scales, result.g_idx, bits=config.bits,
                         checkpoint_format=config.checkpoint_format, dtype=torch.float32)
    assert torch.allclose(rebuilt, result.dequantized(), atol=1e-6)


def test_dead_inputs_are_zeroed_and_act_order_g_idx_is_a_permutation_of_groups() -> None:
    W, H = _problem(dead=(3, 9))
    result = gptq_quantize(W, H, QuantizeConfig(group_size=16, desc_act=True, static_groups=False))
    assert torch.all(result.dequantized()[:, [3, 9]] == 0)
    assert sorted(result.g_idx.tolist()) == sorted(i // 16 for i in range(64))
    assert result.g_idx.tolist() != sorted(result.g_idx.tolist())  # dynamic act-order groups are non-monotonic
    static = gptq_quantize(W, H, QuantizeConfig(group_size=16, desc_act=True, static_groups=True))
    assert static.g_idx.tolist() == [i // 16 for i in range(64)]


def test_asymmetric_v1_never_stores_zero_point_zero() -> None:
    W = torch.rand(32, 64) + 0.1  # all positive: the unclamped zero would be 0
    H = torch.eye(64) * 2
    for config in (QuantizeConfig(sym=False, group_size=16), QuantizeConfig(sym=False, group_size=16, bits=2)):
        result = gptq_quantize(W, H, config)
        assert int(result.zeros.min()) >= 1
        pack_qzeros(result.zeros, config.bits)  # v1 accepts it
        assert (result.dequantized() - W).abs().max() <= result.scales.float().max() / 2 + 1e-6
    v2 = gptq_quantize(W, H, QuantizeConfig(sym=False, group_size=16, checkpoint_format="gptq_v2"))
    assert int(v2.zeros.min()) == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_every_bit_width(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 40), generator=generator, dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_qweight(values, bits), bits, 64), values)
    zeros = torch.randint(1, 2**bits, (4, 64), generator=generator, dtype=torch.int32)
    assert torch.equal(unpack_qzeros(pack_qzeros(zeros, bits), bits, 64), zeros)


def test_damp_is_raised_when_cholesky_fails(caplog: pytest.LogCaptureFixture) -> None:
    W = torch.randn(8, 16)
    config = QuantizeConfig(group_size=-1, damp_percent=0.01)
    with pytest.raises(CholeskyFailure, match="linear: Hessian is not positive definite even with damp_percent=1"):
        gptq_quantize(W, -torch.eye(16), config)  # negative definite: no dampening helps
    assert gptq_quantize(W, torch.ones(16, 16) * 2.0, config).damp_percent == 0.01  # rank one: first try works
    H = torch.eye(16)
    H[1, 1] = -0.1  # needs damp * mean(diag) > 0.1: 0.01 -> 0.02 -> 0.04 -> 0.08 -> 0.16
    with caplog.at_level("WARNING"):
        result = gptq_quantize(W, H, config)
    assert result.damp_percent == pytest.approx(0.16)
    assert "Cholesky needed damp_percent 0.16" in caplog.text


def test_bad_inputs_have_clear_messages() -> None:
    W, H = _problem()
    with pytest.raises(UsageError, match="group_size=24 does not divide the layer's 64 inputs"):
        gptq_quantize(W, H, QuantizeConfig(group_size=24))
    with pytest.raises(UsageError, match="group_size=24 does not divide"):
        rtn_quantize(W, QuantizeConfig(group_size=24))
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="NaN or inf"):
        gptq_quantize(bad, H, QuantizeConfig(group_size=16))
    with pytest.raises(UsageError, match="bits=5 is not supported"):
        QuantizeConfig(bits=5)
    with pytest.raises(UsageError, match="checkpoint_format='awq' is unknown"):
        QuantizeConfig(checkpoint_format="awq")
    with pytest.raises(QuantizationError, match="no calibration rows"):
        HessianAccumulator(4).hessian()
    accumulator = HessianAccumulator(4)
    accumulator.add(torch.ones(3, 4))
    assert torch.equal(accumulator.hessian(), torch.full((4, 4), 2.0))
    with pytest.raises(QuantizationError, match="already taken"):
        accumulator.hessian()


def _windows(count: int = 12, rows: int = 64, inp: int = 48) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    mix = torch.randn(inp, inp, generator=generator)
    return [torch.randn(rows, inp, generator=generator) @ mix * 10.0 ** float(i % 3) for i in range(count)]


def test_hessian_is_the_same_bits_in_any_window_order_and_any_split_over_ranks() -> None:
    windows = _windows()
    one = HessianAccumulator(48)
    for window in windows:
        one.add(window)
    count = one.count
    expected = one.hessian()
    # three "ranks" with interleaved shares, each summing in reverse, reduced like torch.distributed does
    ranks = [HessianAccumulator(48) for _ in range(3)]
    for index in reversed(range(len(windows))):
        ranks[index % 3].add(windows[index])
    total = HessianAccumulator(48)
    total.sum = ranks[2].sum + (ranks[1].sum + ranks[0].sum)
    total.count = sum(rank.count for rank in ranks)
    assert total.count == count
    assert torch.equal(total.hessian(), expected)
    # what this guards against: an fp32 running sum of the same products depends on the order
    forward, backward = torch.zeros(48, 48), torch.zeros(48, 48)
    for window in windows:
        forward.addmm_(window.t(), window)
    for window in reversed(windows):
        backward.addmm_(window.t(), window)
    assert not torch.equal(forward, backward)
    exact = sum(window.double().t() @ window.double() for window in windows) * (2 / count)
    torch.testing.assert_close(expected, exact.float(), rtol=0, atol=1e-6 * float(exact.abs().max()))


def test_hessian_blocks_cover_every_row_and_free_the_fp64_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    from gptq_tools.quant import gptq as gptq_module

    windows = _windows(count=3, inp=40)
    assert gptq_module.block_rows(128) == 128 and gptq_module.block_rows(4096) == 512  # 4 MiB; an eighth
    assert gptq_module.block_rows(57344) == (1 << 24) // 57344  # at most 64 MiB
    monkeypatch.setattr(gptq_module, "BLOCK_MIN_ELEMENTS", 7 * 40)
    monkeypatch.setattr(gptq_module, "BLOCK_MAX_ELEMENTS", 7 * 40)  # blocks of 7 rows, the last one 5
    accumulator = HessianAccumulator(40)
    for window in windows:
        accumulator.add(window)
    assert accumulator.sum.dtype == torch.float64
    H = accumulator.hessian()
    assert H.dtype == torch.float32 and accumulator.sum.numel() == 0  # the fp64 sum is gone
    exact = sum(window.double().t() @ window.double() for window in windows) * (2 / (3 * 64))
    torch.testing.assert_close(H, exact.float(), rtol=0, atol=1e-6 * float(exact.abs().max()))


def test_find_params_symmetric_zero_and_fp16_scales() -> None:
    W = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 0.0, 0.0]])
    for bits, sym in itertools.product((2, 3, 4, 8), (True, False)):
        scale, zero = find_params(W, bits=bits, sym=sym)
        assert torch.equal(scale, scale.half().float())
        if sym:
            assert torch.all(zero == 2 ** (bits - 1))
