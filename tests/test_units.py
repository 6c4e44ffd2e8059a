"""Sizes: ours against accelerate's own parser over one table; a bare number is bytes everywhere."""

from __future__ import annotations

from typing import Any

import pytest
from accelerate.utils.modeling import convert_file_size_to_int, get_max_memory

from gptq_tools.cli import main
from gptq_tools.errors import UsageError
from gptq_tools.runtime.plan import parse_gpus, parse_max_memory
from gptq_tools.units import parse_size

#: Every form a user might type; accelerate decides what each means (or that it is refused).
TABLE: list[str | int] = [
    "60GiB", "60gib", "60GIB", "60Gib", "60GB", "60gb", "60Gb", "60gB", "60G", "60g", "60Gi", "1.5GiB", "1.5GB",
    "0.1GB", "1.1Gb", "512MiB", "512mib", "512MB", "512mb", "100KB", "100kb", "100KiB", "1024kib", "60", "0",
    "4096", "0GiB", "-0GiB", "-1GiB", "-60GB", "-0.5GiB", " 60GiB", "60 GiB", "60GiB ", "+60GiB", ".5GiB",
    "60.GiB", "1e9", "1e9B", "1e1GB", "1e300GB", "infGiB", "nanGiB", "GiB", "", " ", "60B", "60b", "1TB",
    "1TiB", "60 G B", "60GiBs", "sixtyGB", "1_000MB", "0x10GB", 0, 60, 2**40, -1,
]


def accelerate_bytes(value: str | int) -> int | None:
    """What accelerate makes of ``value`` as a ``max_memory`` entry, or None when it refuses it.

    accelerate gives a bare number a meaning only as an ``int`` (bytes); ours reads a string of digits the
    same way, since a command line has no ints. That is the one place the two are fed differently.
    ``get_max_memory`` converts strings with ``convert_file_size_to_int`` and passes ints through
    unchecked (even -1, which its parser refuses: so do we).
    """
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        value = int(value)
    try:
        converted = convert_file_size_to_int(value)
    except (ValueError, OverflowError):
        return None
    assert get_max_memory({"cpu": value})["cpu"] == converted
    return converted


def ours(value: str | int) -> int | None:
    try:
        return parse_size(value, what="--max-memory cpu")
    except UsageError as exc:
        assert str(exc).startswith("--max-memory cpu: ")
        return None


@pytest.mark.parametrize("value", TABLE, ids=[repr(v) for v in TABLE])
def test_sizes_match_accelerate(value: str | int) -> None:
    assert ours(value) == accelerate_bytes(value)


def test_table_covers_both_outcomes() -> None:
    outcomes = [accelerate_bytes(v) for v in TABLE]
    assert outcomes.count(None) >= 15 and len([o for o in outcomes if o is not None]) >= 25
    assert accelerate_bytes("60gib") == 60 * 2**30 and accelerate_bytes("60gb") == 60 * 10**9 // 8


@pytest.mark.parametrize(("text", "message"), [
    ("60G", r"'60G' has no byte unit \(accelerate refuses it\): write 60GiB \(2\^30\) or 60GB \(10\^9\)"),
    ("-1GiB", "'-1GiB' is negative"),
    ("infGiB", "'infGiB' is not a finite size"),
    ("sixtyGB", "'sixty' in 'sixtyGB' is not a number"),
    ("1TB", "'1TB' is not a size accelerate accepts; write it like 60GiB"),
    (-1, "-1 is negative"),
    (1.5, "1.5 is not a size"),
    (True, "True is not a size"),
])
def test_refusals_say_how_to_write_it(text: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_size(text, what="--max-memory 0")


def test_lowercase_b_counts_bits_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    assert parse_size("60gb", what="--max-memory 0") == 7_500_000_000
    assert "'60gb' ends in a lowercase b, so it counts bits (as in accelerate): 7.50 GB; write 60GB" in caplog.text


def test_bare_number_is_bytes_in_every_option() -> None:
    assert parse_max_memory("0=4096,cpu=1GiB") == {0: 4096, "cpu": 2**30}
    assert parse_max_memory({0: 4096, 1: "4096"}) == {0: 4096, 1: 4096}
    assert parse_gpus("2x4096") == {0: 4096, 1: 4096}
    assert parse_size("4096", what="--max-shard-size") == parse_size("4096", what="--max-size") == 4096


def test_cli_refuses_a_bare_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "bloomz-176b-gptq", "--max-memory", "0=60G,1=79GiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptq-tools: error: max_memory[0]: '60G' has no byte unit") and err.count("\n") == 1


def test_cli_lowercase_gib_is_gibibytes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "bloomz-176b-gptq", "--max-memory", "0=60gib,1=79gib"]) == 0
    assert "60.00 GiB" in capsys.readouterr().out
