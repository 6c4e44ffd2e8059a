"""The quantize settings: what the checkpoint's config says, what is refused, what is warned about."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptq_tools.cli import main as cli_main
from gptq_tools.errors import UsageError
from gptq_tools.quant.config import QuantizeConfig


def _qconfig(config: QuantizeConfig) -> dict:
    return config.quantize_config_dict(model_name_or_path=None, model_file_base_name="model")


def test_defaults_are_static_act_order_written_as_desc_act_false_with_format_and_meta() -> None:
    config = QuantizeConfig()
    assert (config.bits, config.group_size, config.desc_act, config.static_groups, config.sym,
            config.checkpoint_format) == (4, 128, True, True, True, "gptq")
    written = _qconfig(config)
    assert written["desc_act"] is False  # g_idx is i // group_size: loaders must not reorder
    assert written["static_groups"] is True
    assert written["format"] == written["checkpoint_format"] == "gptq"
    assert written["quant_method"] == "gptq" and written["model_file_base_name"] == "model"
    assert written["meta"]["act_order"] == "static" and written["meta"]["static_groups"] is True
    assert written["meta"]["quantizer"][0].startswith("gptq-tools:")
    assert config.client_warnings() == []  # the defaults load in transformers, GPTQModel and vLLM


@pytest.mark.parametrize(("settings", "desc_act", "act_order", "static_groups"), [
    ({"group_size": 32, "static_groups": False}, True, "dynamic", False),
    ({"group_size": -1, "static_groups": False}, False, "static", False),  # one group per row: g_idx all 0
    ({"group_size": 32, "desc_act": False}, False, "off", False),
    ({"group_size": 32, "desc_act": False, "checkpoint_format": "gptq_v2", "sym": False}, False, "off", False),
])
def test_desc_act_is_written_only_when_g_idx_needs_it(settings: dict, desc_act: bool, act_order: str,
                                                       static_groups: bool) -> None:
    written = _qconfig(QuantizeConfig(**settings))
    assert written["desc_act"] is desc_act
    assert written["meta"]["act_order"] == act_order
    assert written["static_groups"] is static_groups
    assert written["format"] == settings.get("checkpoint_format", "gptq")


@pytest.mark.parametrize("damp", [0.0, 1.0, -0.01, 1.5])
def test_damp_outside_open_unit_interval_is_refused(damp: float) -> None:
    with pytest.raises(UsageError, match=r"outside \(0, 1\).*use e\.g\. 0\.01"):
        QuantizeConfig(damp_percent=damp)


def test_damp_above_damp_max_is_refused() -> None:
    with pytest.raises(UsageError, match="above damp_max=0.05"):
        QuantizeConfig(damp_percent=0.1, damp_max=0.05)


@pytest.mark.parametrize(("settings", "expected"), [
    ({"group_size": 32, "static_groups": False}, ["which vLLM refuses", "use --static-groups"]),
    ({"sym": False, "checkpoint_format": "gptq_v2"}, ["refused by vLLM", "use --sym"]),
    ({"sym": False}, ["refused by vLLM", "use --sym", "asymmetric v1 is refused by GPTQModel", "--format gptq_v2"]),
    ({"bits": 8}, ["refused by vLLM on CPU", "use --bits 4"]),
    ({"bits": 3}, ["3-bit checkpoints are refused by vLLM", "use --bits 4"]),
    ({"group_size": 16}, ["group size 16 is refused by vLLM", "use --group-size 128"]),
])
def test_client_warnings_name_the_client_and_what_to_use(settings: dict, expected: list[str]) -> None:
    text = "\n".join(QuantizeConfig(**settings).client_warnings())
    for fragment in expected:
        assert fragment in text


@pytest.mark.parametrize(("args", "message"), [
    (["--damp", "0"], "damp_percent=0.0 is outside (0, 1): transformers and GPTQModel refuse such a checkpoint"),
    (["--damp", "1"], "damp_percent=1.0 is outside (0, 1)"),
    (["--group-size", "0"], "group_size=0 is invalid; use -1 (no grouping) or a positive divisor"),
    (["--group-size", "-2"], "group_size=-2 is invalid"),
    (["--nsamples", "0"], "--nsamples 0 must be positive"),
    (["--seqlen", "0"], "--seqlen 0 must be positive"),
])
def test_cli_refuses_before_reading_anything(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                             message: str) -> None:
    out = tmp_path / "out"
    code = cli_main(["quantize", str(tmp_path / "no-such-model"), "-o", str(out), "--calibration",
                     str(tmp_path / "no-such.txt"), *args])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("gptq-tools: error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written


def test_cli_warns_about_settings_a_client_refuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["quantize", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "out"), "--calibration",
                     str(tmp_path / "no-such.txt"), "--asym", "--no-static-groups", "--group-size", "32"])
    err = capsys.readouterr().err
    assert code != 0  # the missing model is the error; the warnings come first, before anything is read
    warnings = [line for line in err.splitlines() if line.startswith("gptq-tools: warning: ")]
    assert len(warnings) == 3
    assert "desc_act=true, which vLLM refuses" in warnings[0]
    assert "asymmetric v1 is refused by GPTQModel" in err
