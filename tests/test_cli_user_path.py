"""The user's path, round 3: one grammar (global options anywhere, "did you mean", ``-q``), presets, Hub URLs,
and messages that name the cause and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptq_tools.checkpoint.presets import load_preset, parse_model_spec, strip_hub_url
from gptq_tools.cli import build_parser, main
from gptq_tools.errors import CalibrationError, OutputExistsError
from gptq_tools.files.paths import looks_like_path
from tests.hub_server import HubServer

from .download_helpers import populate
from .helpers import random_model_file, sha256, split_bytes, write_fake_gptq_checkpoint


# ------------------------------------------------------------------------------------- grammar
@pytest.mark.parametrize("argv", [
    ["-q", "--no-progress", "verify", "x"],
    ["verify", "x", "-q", "--no-progress"],
    ["verify", "-q", "x", "--no-progress"],
])
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.no_progress, args.command) == (True, True, "verify")


def test_every_global_option_reaches_every_command() -> None:
    parser = build_parser()
    top = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help", "--version"}
    commands = next(a for a in parser._actions if a.choices and "download" in a.choices).choices
    for name, sub in commands.items():
        assert top <= set(sub._option_string_actions), name
        if name != "verify":  # verify --quiet is sha256sum's (print no OK lines); -q is still the global one
            assert all(sub._option_string_actions[s].dest == parser._option_string_actions[s].dest for s in top)


def test_verbose_after_the_command_counts() -> None:
    assert build_parser().parse_args(["plan", "x", "-vv"]).verbose == 2
    assert build_parser().parse_args(["-v", "plan", "x"]).verbose == 1


def test_unknown_command_suggests_the_nearest(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["donwload", "org/x"])
    assert exc.value.code == 2
    assert "invalid choice: 'donwload'" in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(SystemExit):
        main(["donwload", "org/x"])
    assert capsys.readouterr().err.rstrip().endswith("did you mean 'download'?")


def test_unknown_option_blames_the_command_with_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["download", "org/x", "--dryrun"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gptq-tools download")  # the command's usage, not the top-level one
    assert err.rstrip().endswith("gptq-tools download: error: unrecognized arguments: --dryrun; "
                                 "did you mean --dry-run?")
    with pytest.raises(SystemExit):
        main(["download", "org/x", "--zzzzzz"])
    assert "did you mean" not in capsys.readouterr().err


def test_quiet_is_errors_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = random_model_file(tmp_path / "model.safetensors")
    assert main(["verify", str(model), "--sha256", sha256(model)]) == 0
    assert capsys.readouterr().out == f"{model}: OK\n"
    assert main(["verify", str(model), "--sha256", sha256(model), "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["verify", str(model), "--sha256", "0" * 64, "-q"]) == 1
    assert "did NOT match" in capsys.readouterr().err
    assert main(["-q", "verify", str(model), "--sha256", sha256(model), "--json"]) == 0  # asked-for output stays
    assert json.loads(capsys.readouterr().out)["ok"] is True


# ------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["BLOOMZ-176B-GPTQ", "Bloomz-176b-Gptq", "thebloke/BLOOMZ-176B-gptq"])
def test_preset_names_ignore_case(name: str) -> None:
    assert load_preset(name).name == "bloomz-176b-gptq"


@pytest.mark.parametrize(("url", "spec"), [
    ("https://huggingface.co/TheBloke/bloomz-176B-GPTQ", "TheBloke/bloomz-176B-GPTQ"),
    ("https://huggingface.co/org/model/", "org/model"),
    ("https://huggingface.co/org/model/tree/group_size_128g", "org/model:group_size_128g"),
    ("https://hf.co/org/model/blob/dev/config.json", "org/model:dev"),
    ("org/model", "org/model"),
    ("https://huggingface.co/datasets/org/data", "https://huggingface.co/datasets/org/data"),
])
def test_hub_urls_name_repositories(url: str, spec: str) -> None:
    assert strip_hub_url(url) == spec
    assert not looks_like_path(url)


def test_hub_url_is_accepted_as_a_model() -> None:
    spec = parse_model_spec("https://huggingface.co/TheBloke/bloomz-176B-GPTQ/tree/group_size_128g")
    assert (spec.repo_id, spec.revision, spec.preset is not None) == ("TheBloke/bloomz-176B-GPTQ",
                                                                      "group_size_128g", True)


def test_presets_lists_names_repositories_branches_and_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    bloom = rows["bloomz-176b-gptq"]
    assert bloom["repo_id"] == "TheBloke/bloomz-176B-GPTQ"
    sizes = {b["name"]: b["weight_bytes"] for b in bloom["branches"]}
    assert set(sizes) == {"main", "group_size_128g"} and sizes["group_size_128g"] > sizes["main"] > 80 * 2**30
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    assert "bloomz-176b-gptq  TheBloke/bloomz-176B-GPTQ" in text
    assert "  :group_size_128g  4-bit, group size 128, 90.31 GiB of weights" in text


# ------------------------------------------------------------------------------------- messages
def test_join_again_without_a_hash_names_the_cli_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    source = random_model_file(tmp_path / "src" / "m.safetensors")
    parts = split_bytes(source, tmp_path / "parts", source.stat().st_size // 2 + 1)
    assert main(["join", *map(str, parts), "-o", str(tmp_path / "out.safetensors")]) == 0
    capsys.readouterr()
    assert main(["join", *map(str, parts), "-o", str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "force=True" not in err
    assert ("output already exists and, with no expected hash, cannot be told from a good join (pass --sha256 HEX "
            "or --manifest SHA256SUMS to check it and keep it); pass --force to overwrite it") in err


def test_calibration_folder_is_named_as_a_folder(tmp_path: Path) -> None:
    from gptq_tools.quant.calibration import load_calibration

    (tmp_path / "calib").mkdir()
    with pytest.raises(CalibrationError, match=r"calib is a folder; give one calibration file in it \(.txt, "):
        load_calibration(tmp_path / "calib", tokenizer=None, nsamples=1, seqlen=8)


def test_quantizing_a_quantized_checkpoint_says_so(tmp_path: Path) -> None:
    from gptq_tools.errors import CheckpointError
    from gptq_tools.quant.source import SourceModel

    folder = write_fake_gptq_checkpoint(tmp_path / "gptq")
    with pytest.raises(CheckpointError, match=r"gptq: already a quantized checkpoint \(gptq: quantize_config.json "
                                              r"or quantization_config in config.json\); quantize the fp16 model"):
        SourceModel(folder, dtype=__import__("torch").float32)


def test_quantize_rerun_into_its_finished_output_points_at_resume(tmp_path: Path) -> None:
    from gptq_tools.quant.save import check_output_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "quantize_config.json").write_text("{}")
    (out / "SHA256SUMS").write_text("")
    with pytest.raises(OutputExistsError, match=r"already holds a quantized checkpoint \(quantize_config.json, "
                                                r"SHA256SUMS\); --resume keeps it when every file matches SHA256SUMS"):
        check_output_folder(out)
    (out / "quantize_config.json").unlink()
    with pytest.raises(OutputExistsError, match="output folder is not empty; choose another or empty it"):
        check_output_folder(out)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_download_into_proc_is_not_a_space_problem(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer() as server:
        populate(server)
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        assert main(["download", "org/split", "--local-dir", "/proc/nope"]) == 1
    err = capsys.readouterr().err
    assert err == ("gptq-tools: error: /proc/nope: /proc is a virtual filesystem (no storage at all, like /proc or "
                   "/sys) and cannot hold downloaded files; choose another --local-dir\n")


def test_caps_without_a_unit_warn(capsys: pytest.CaptureFixture[str]) -> None:
    main(["plan", "bloomz-176b-gptq", "--gpus", "2x80"])
    err = capsys.readouterr().err
    assert "--gpus: cap(s) below 1 MiB (0=80 B, 1=80 B): a bare number is bytes; write the unit" in err
    main(["plan", "bloomz-176b-gptq", "--gpus", "2x80GB"])
    assert "below 1 MiB" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------- verify: one meaning of ok
def test_unverified_is_not_ok_in_any_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = random_model_file(tmp_path / "model.safetensors")
    parts = split_bytes(model, tmp_path / "parts", model.stat().st_size // 2 + 1)
    assert main(["verify", "--parts", str(parts[0].parent), "--json"]) == 1  # nothing to compare with
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["failed"], report["results"][0]["status"]) == (False, 1, "UNVERIFIED")
    assert main(["verify", "--parts", str(parts[0].parent)]) == 1
    captured = capsys.readouterr()
    assert captured.out == f"{sha256(model)}  model.safetensors\n"
    assert "NOT verified: no expected hash" in captured.err and "1 file(s) could not be verified" in captured.err
    assert main(["verify", "--parts", str(parts[0].parent), "--sha256", sha256(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    # sha256sum FILE: only hashes were asked for; they are HASHED, not "verified"
    assert main(["verify", str(model), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["results"][0]["status"]) == (True, "HASHED")


def test_smallest_change_is_exact_for_a_tiny_model(tmp_path: Path) -> None:
    """A 1 MiB model used to be told to add 64 MiB: the bisection now runs over bytes."""
    from gptq_tools.runtime.plan import PlanOptions, load_layout, place_layout
    from gptq_tools.units import parse_size

    from .tiny_gptq import build_tiny_checkpoint

    folder = build_tiny_checkpoint(tmp_path / "tiny").folder
    options = PlanOptions(batch_size=1, seq_len=16, cuda_context_bytes=0)
    layout, _ = load_layout(folder, options=options)
    placement = place_layout(layout, {0: layout.total_weight_bytes // 2}, options)
    assert not placement.fits
    exact = int(placement.suggestion.split("; ")[1].split(" bytes exactly")[0])
    printed = parse_size(placement.suggestion.split("raise GPU 0 to ")[1].split(" ")[0])
    assert place_layout(layout, {0: exact}, options).fits and not place_layout(layout, {0: exact - 1}, options).fits
    assert 0 <= printed - exact < 0.01 * 2**20 and exact < layout.total_weight_bytes + 64 * 2**20
