"""fp-target: its math (the full-precision target, the cross term) and the MSE scale search on synthetic problems,
then end to end through the streaming driver (format, quality, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptq_tools.checkpoint.tiny import TinySpec, build_tiny_model
from gptq_tools.errors import QuantizationError, UsageError
from gptq_tools.quant.config import QuantizeConfig
from gptq_tools.quant.driver import quantize_model
from gptq_tools.quant.evaluate import compare_to_reference, load_for_eval, log_probs
from gptq_tools.quant.fp_target import CrossAccumulator, fp_target_quantize
from gptq_tools.quant.gptq import HessianAccumulator, gptq_quantize
from gptq_tools.quant.rtn import rtn_quantize
from gptq_tools.quant.scales import find_params, mse_params, quantize_values


def _streams(rows: int = 3000, inp: int = 64, *, seed: int = 0, drift: float = 0.3,
             dead: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(full-precision inputs X, quantized-model inputs X~): X~ is X plus a correlated error of size ``drift``."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=generator) * 0.3
    X = torch.randn(rows, inp, generator=generator) @ mix
    Xq = X + drift * (torch.randn(rows, inp, generator=generator) @ mix + 0.5 * X @ mix)
    Xq[:, list(dead)] = 0
    return X, Xq


def _statistics(X: torch.Tensor, Xq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hessian, cross = HessianAccumulator(X.shape[1]), CrossAccumulator(X.shape[1])
    half = X.shape[0] // 2
    for part in (slice(0, half), slice(half, None)):  # two batches: the sums are divided once, at the end
        hessian.add(Xq[part])
        cross.add(X[part], Xq[part])
    return hessian.hessian(), cross.cross()


def _mismatch(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor, Xq: torch.Tensor) -> float:
    """The mismatched objective: mean squared distance of ``Q`` on X~ from the full-precision ``W`` on X."""
    return float(((X @ W.t() - Xq @ Q.t()) ** 2).sum() / X.shape[0])


def test_cross_term_is_two_over_n_of_the_paired_products() -> None:
    X, Xq = _streams(rows=50, inp=8)
    _, D = _statistics(X, Xq)
    torch.testing.assert_close(D, 2 / 50 * (X - Xq).t() @ Xq, rtol=1e-5, atol=1e-6)
    cross = CrossAccumulator(8)
    with pytest.raises(QuantizationError, match=r"full-precision inputs \(3, 8\) and quantized inputs \(2, 8\) "
                                                r"do not pair up"):
        cross.add(X[:3], Xq[:2])
    with pytest.raises(QuantizationError, match="no paired calibration rows reached this linear"):
        cross.cross()


def test_cross_term_is_the_same_bits_in_any_window_order() -> None:
    X, Xq = _streams(rows=240, inp=16)
    forward, backward = CrossAccumulator(16), CrossAccumulator(16)
    windows = [slice(start, start + 40) for start in range(0, 240, 40)]
    for window in windows:
        forward.add(X[window], Xq[window])
    for window in reversed(windows):
        backward.add(X[window], Xq[window])
    assert torch.equal(forward.cross(), backward.cross())


def test_target_is_the_ridge_least_squares_solution() -> None:
    X, Xq = _streams(inp=32)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    H, D = _statistics(X, Xq)
    config = QuantizeConfig(bits=8, group_size=-1, desc_act=True)
    _, target = fp_target_quantize(W, H, D, config)
    # argmin_V ||W X - V X~||^2 + lambda ||V - W||^2 with the damped lambda, solved directly
    ridge = config.damp_percent * float(torch.diag(H).mean())
    n = X.shape[0]
    direct = (2 / n * W @ X.t() @ Xq + ridge * W) @ torch.linalg.inv(H + ridge * torch.eye(32))
    torch.testing.assert_close(target, direct, rtol=2e-3, atol=2e-4)


def test_without_drift_it_is_plain_gptq() -> None:
    X, _ = _streams()
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    H, D = _statistics(X, X)  # the quantized model's inputs equal the full-precision ones: D = 0
    assert float(D.abs().max()) == 0.0
    config = QuantizeConfig(bits=3, group_size=16)
    result, _ = fp_target_quantize(W, H, D, config)
    plain = gptq_quantize(W, H, config)
    assert result.method == "fp-target"
    assert torch.equal(result.intweight, plain.intweight) and torch.equal(result.scales, plain.scales)
    assert torch.equal(result.g_idx, plain.g_idx)


SETTINGS = [
    {"bits": 4, "group_size": 16},
    {"bits": 3, "group_size": 16, "static_groups": False},
    {"bits": 3, "group_size": -1, "desc_act": False},
    {"bits": 2, "group_size": 32, "sym": False},
    {"bits": 3, "group_size": 16, "scale_search": "mse"},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_it_corrects_the_inherited_error_that_gptq_passes_on(settings: dict) -> None:
    X, Xq = _streams(dead=(5,))
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    H, D = _statistics(X, Xq)
    config = QuantizeConfig(**settings)
    ours, target = fp_target_quantize(W, H, D, config)
    plain = gptq_quantize(W, H, config)
    assert _mismatch(W, ours.dequantized(), X, Xq) < 0.8 * _mismatch(W, plain.dequantized(), X, Xq)
    assert torch.all(target[:, 5] == 0) and torch.all(ours.dequantized()[:, 5] == 0)  # dead input
    # the reported error is the reducible part, against the same target RTN is measured on
    assert ours.error < float(((target - rtn_quantize(W, config).dequantized()) @ H
                               * (target - rtn_quantize(W, config).dequantized())).sum() / 2)


def test_half_the_correction_lands_between() -> None:
    X, Xq = _streams()
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    H, D = _statistics(X, Xq)
    configs = [QuantizeConfig(bits=8, group_size=-1, target_alpha=alpha) for alpha in (0.25, 0.5, 1.0)]
    errors = [_mismatch(W, fp_target_quantize(W, H, D, config)[0].dequantized(), X, Xq) for config in configs]
    assert errors[0] > errors[1] > errors[2]


def test_bad_cross_terms_are_refused() -> None:
    X, Xq = _streams(inp=16)
    W = torch.randn(8, 16)
    H, D = _statistics(X, Xq)
    with pytest.raises(UsageError, match=r"layers.0.fc1: cross term shape \(8, 8\) does not match the Hessian"):
        fp_target_quantize(W, H, D[:8, :8], QuantizeConfig(group_size=-1), name="layers.0.fc1")
    D[2, 3] = float("inf")
    with pytest.raises(QuantizationError, match="layers.0.fc1: the full-precision/quantized cross term has NaN"):
        fp_target_quantize(W, H, D, QuantizeConfig(group_size=-1), name="layers.0.fc1")


@pytest.mark.parametrize("sym,zero_min", [(True, 0), (False, 0), (False, 1)])
def test_mse_scales_never_round_worse_and_clip_outliers(sym: bool, zero_min: int) -> None:
    generator = torch.Generator().manual_seed(5)
    W = torch.randn(64, 32, generator=generator)
    W[:, 0] = 3.0  # one outlier per row stretches the min/max grid for the other 31 weights
    maxq = 7

    def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        q = quantize_values(W, scale.unsqueeze(1), zero.unsqueeze(1), maxq)
        return ((W - scale.unsqueeze(1) * (q - zero.unsqueeze(1))).abs() ** 2.4).sum(1)

    minmax = find_params(W, bits=3, sym=sym, zero_min=zero_min)
    searched = mse_params(W, bits=3, sym=sym, zero_min=zero_min)
    assert torch.all(error(*searched) <= error(*minmax))
    assert float(error(*searched).sum()) < 0.95 * float(error(*minmax).sum())
    assert float((searched[0] < minmax[0]).float().mean()) > 0.5  # mostly the outlier is clipped: a finer step
    assert torch.equal(searched[0], searched[0].half().float())  # fp16 scales, as stored
    if sym:
        assert torch.all(searched[1] == 4)
    assert torch.all(searched[1] >= zero_min)


def test_config_records_the_method_in_meta() -> None:
    config = QuantizeConfig(method="fp-target", target_alpha=0.5, scale_search="mse")
    written = config.quantize_config_dict(model_name_or_path=None, model_file_base_name="model")
    assert written["meta"]["method"] == "fp-target"
    assert written["meta"]["target_alpha"] == 0.5 and written["meta"]["scale_search"] == "mse"
    assert written["quant_method"] == "gptq" and written["checkpoint_format"] == "gptq"
    plain = QuantizeConfig(method="gptq").quantize_config_dict(model_name_or_path=None, model_file_base_name="m")
    assert set(plain) == set(written) and "target_alpha" not in plain["meta"]
    with pytest.raises(UsageError, match="method='gptaq' is unknown; use one of gptq, fp-target, rtn"):
        QuantizeConfig(method="gptaq")
    with pytest.raises(UsageError, match=r"target_alpha=0 is outside \(0, 1\]"):
        QuantizeConfig(target_alpha=0)
    with pytest.raises(UsageError, match="scale_search='l1' is unknown; use one of minmax, mse"):
        QuantizeConfig(scale_search="l1")


# ---------------------------------------------------------------------------------------------------
# end to end through the streaming driver


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(hidden=64, layers=2, heads=2, vocab_size=512, seqlen=64, batch=8, steps=60)
    return build_tiny_model("llama", tmp_path_factory.mktemp("fp") / "llama", spec=spec)


def _kl(model: Path, folder: Path) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = torch.tensor(tokenizer((model / "eval.txt").read_text()[:6000])["input_ids"])
    reference = log_probs(load_for_eval(model), ids, seqlen=64)
    return compare_to_reference(load_for_eval(folder), ids, reference, seqlen=64)[1]


def _checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_driver_writes_the_same_format_and_a_closer_model(tiny_llama: Path, tmp_path: Path) -> None:
    kwargs = dict(calibration=tiny_llama / "train.txt", nsamples=12, seqlen=64, single_file=True)
    config = QuantizeConfig(bits=3, group_size=32)
    plain = quantize_model(tiny_llama, tmp_path / "gptq", config=config, method="gptq", **kwargs)
    ours = quantize_model(tiny_llama, tmp_path / "fp", config=config, method="fp-target", **kwargs)
    assert {r.method for r in ours.linears} == {"fp-target"} and not ours.fallbacks
    assert all(r.error < r.rtn_error for r in ours.linears)
    theirs, mine = _checkpoint(tmp_path / "gptq"), _checkpoint(tmp_path / "fp")
    assert {k: (v.shape, v.dtype) for k, v in theirs.items()} == {k: (v.shape, v.dtype) for k, v in mine.items()}
    written = json.loads((tmp_path / "fp" / "quantize_config.json").read_text())
    assert written["meta"]["method"] == "fp-target" and written["meta"]["target_alpha"] == 1.0
    assert set(written) == set(json.loads((tmp_path / "gptq" / "quantize_config.json").read_text()))
    assert not list((tmp_path).glob(".*partial*"))  # no reference-*.safetensors or work folder left behind
    assert _kl(tiny_llama, tmp_path / "fp") < _kl(tiny_llama, tmp_path / "gptq")
    assert plain.linears[0].error == pytest.approx(ours.linears[0].error, rel=1e-3)  # layer 0: the streams agree


def test_resume_continues_the_reference_stream(tiny_llama: Path, tmp_path: Path) -> None:
    kwargs = dict(calibration=tiny_llama / "train.txt", nsamples=8, seqlen=64, single_file=True,
                  config=QuantizeConfig(bits=4, group_size=32, method="fp-target"))
    quantize_model(tiny_llama, tmp_path / "straight", **kwargs)

    def crash(index: int) -> None:
        if index == 0:
            work = tmp_path / ".resumed.gptq-tools-partial" / ".work"
            assert (work / "reference-00001.safetensors").is_file()  # committed with the layer
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_llama, tmp_path / "resumed", on_layer_done=crash, **kwargs)
    with pytest.raises(QuantizationError, match="the interrupted run used another model, calibration or settings"):
        quantize_model(tiny_llama, tmp_path / "resumed", resume=True, **{**kwargs, "config": QuantizeConfig(
            bits=4, group_size=32, method="gptq")})
    summary = quantize_model(tiny_llama, tmp_path / "resumed", resume=True, **kwargs)
    assert summary.resumed_from_layer == 1
    for name in ("model.safetensors", "SHA256SUMS", "quantize_config.json"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
