"""Units, packing round trips, architecture table, presets, CLI error mapping."""

from __future__ import annotations

import pytest
import torch

from gptq_tools.checkpoint import packing
from gptq_tools.checkpoint.architectures import get_arch
from gptq_tools.checkpoint.presets import list_presets, load_preset
from gptq_tools.cli import main
from gptq_tools.errors import UnsupportedArchitectureError, UsageError
from gptq_tools.units import format_size


def test_format_size() -> None:
    assert format_size(45 * 1024**3) == "45.00 GiB"
    assert format_size(512) == "512 B"
    assert format_size(5 * 10**9, binary=False) == "5.00 GB"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_rows_and_cols(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 96), generator=generator)
    packed = packing.pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 96)
    assert torch.equal(packing.unpack_rows(packed, bits), values.to(torch.int32))
    packed_cols = packing.pack_cols(values, bits)
    assert packed_cols.shape == (64, 96 * bits // 32)
    assert torch.equal(packing.unpack_cols(packed_cols, bits), values.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_autogptq_bit_stream(bits: int) -> None:
    """Value k of a column sits at bit k*bits of the little-endian stream of int32 words."""
    values = torch.randint(0, 2**bits, (32, 3), generator=torch.Generator().manual_seed(0))
    packed = packing.pack_rows(values, bits)
    for column in range(3):
        stream = sum(int(v) << (k * bits) for k, v in enumerate(values[:, column].tolist()))
        words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(bits)]
        assert [int(w) & 0xFFFFFFFF for w in packed[:, column].tolist()] == words


def test_symmetric_4bit_v1_stores_seven_for_zero_eight() -> None:
    zeros = torch.full((2, 8), 8)
    qzeros = packing.pack_qzeros(zeros, 4)
    assert qzeros.tolist() == [[0x77777777], [0x77777777]]
    assert torch.equal(packing.unpack_qzeros(qzeros, 4, 8), zeros.to(torch.int32))
    v2 = packing.pack_qzeros(zeros, 4, checkpoint_format="gptq_v2")
    assert (v2.to(torch.int64) & 0xFFFFFFFF).tolist() == [[0x88888888], [0x88888888]]


def test_v1_refuses_zero_point_zero() -> None:
    with pytest.raises(UsageError, match="gptq_v2"):
        packing.pack_qzeros(torch.zeros(1, 8, dtype=torch.int64), 4)


def test_dequantize_matches_formula() -> None:
    bits, in_features, out_features, group = 4, 64, 16, 32
    generator = torch.Generator().manual_seed(1)
    intweight = torch.randint(0, 16, (in_features, out_features), generator=generator)
    zeros = torch.randint(1, 16, (2, out_features), generator=generator)
    scales = torch.rand(2, out_features, generator=generator).half()
    g_idx = torch.arange(in_features) // group
    weight = packing.dequantize(packing.pack_qweight(intweight, bits), packing.pack_qzeros(zeros, bits), scales,
                                g_idx, bits=bits)
    expected = ((intweight - zeros[g_idx]).float() * scales[g_idx].float()).t().half()
    assert weight.shape == (out_features, in_features)
    assert torch.equal(weight, expected)


def test_unknown_architecture_lists_supported() -> None:
    assert get_arch("bloom").layers_path == "transformer.h"
    with pytest.raises(UnsupportedArchitectureError, match="supported model types: .*bloom.*opt"):
        get_arch("t5", source="/models/t5")


def test_presets() -> None:
    assert {"bloomz-176b-gptq", "opt-iml-30b"} <= set(list_presets())
    preset = load_preset("TheBloke/bloomz-176B-GPTQ")
    assert preset.name == "bloomz-176b-gptq"
    assert preset.expected_sha256("gptq_model-4bit--1g.safetensors").startswith("50baeab9")
    with pytest.raises(UsageError, match="unknown preset 'nope'.*bloomz-176b-gptq"):
        load_preset("nope")


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--version"])
    assert excinfo.value.code == 0
    assert "gptq-tools 0.1.0" in capsys.readouterr().out


def test_every_public_name_resolves() -> None:
    import gptq_tools

    for name in gptq_tools.__all__:
        assert getattr(gptq_tools, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gptq_tools.nope  # noqa: B018


def test_cli_help_lists_every_command_and_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from gptq_tools.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", "building the CLI must not import torch (every command would pay for it)"
