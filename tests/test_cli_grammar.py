"""One grammar for naming a model (PRESET[:BRANCH], REPO[:BRANCH], PATH) and messages about wrong paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptq_tools.checkpoint.presets import list_presets, parse_model_spec, resolve_model
from gptq_tools.cli import main
from gptq_tools.errors import GptqToolsError, NotAFileError, NotAFolderError, PathNotFoundError, UsageError
from gptq_tools.files.paths import looks_like_path, require_file, require_folder

PRESET = "bloomz-176b-gptq"


def error_of(capsys: pytest.CaptureFixture[str], argv: list[str], status: int) -> str:
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith("gptq-tools: error: ") and err.count("\n") == 1, err
    return err.removeprefix("gptq-tools: error: ").strip()


# ------------------------------------------------------------------------------------------- names
def test_model_spec_forms() -> None:
    bloom = parse_model_spec(f"{PRESET}:group_size_128g")
    assert (bloom.repo_id, bloom.revision, bloom.local_dir()) == (
        "TheBloke/bloomz-176B-GPTQ", "group_size_128g", Path("bloomz-176B-GPTQ-group_size_128g"))
    assert parse_model_spec(PRESET).local_dir() == Path("bloomz-176B-GPTQ")
    assert parse_model_spec("TheBloke/bloomz-176B-GPTQ").preset is not None  # a preset's repo id is the preset
    plain = parse_model_spec("org/model", revision="dev")
    assert (plain.repo_id, plain.revision, plain.preset, plain.local_dir()) == ("org/model", "dev", None,
                                                                               Path("model-dev"))


@pytest.mark.parametrize(("text", "revision", "message"), [
    ("a:b:c", None, r"'a:b:c' is not a repository; write it as NAMESPACE/NAME\[:BRANCH\] or a preset name"),
    (":dev", None, r"':dev' is not a repository"),
    ("not a repo!", None, r"'not a repo!' is neither a repository id \(NAMESPACE/NAME\) nor a preset"),
    (f"{PRESET}:main", "dev", r"names branch 'main' but --revision/--branch is 'dev'; give only one"),
])
def test_model_spec_refusals(text: str, revision: str | None, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_model_spec(text, revision=revision)


@pytest.mark.parametrize(("text", "is_path"), [
    ("/abs", True), ("./rel", True), ("../up", True), ("~/x", True), (".", True), ("a/b/c", True),
    ("model.safetensors", True), (PRESET, False), (f"{PRESET}:main", False), ("org/model", False),
    ("org/model:dev", False),
])
def test_looks_like_path(text: str, is_path: bool) -> None:
    assert looks_like_path(text) is is_path


def test_repo_name_stands_for_its_download_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model-dev").mkdir()
    assert resolve_model("org/model:dev", need_folder=True).folder == Path("model-dev")
    with pytest.raises(PathNotFoundError, match=r"org/model: no folder \./model \(where `gptq-tools download "
                                                r"org/model` puts it\); download it first"):
        resolve_model("org/model", need_folder=True)
    preset = resolve_model(PRESET, need_folder=False)  # a preset plans from its own config
    assert preset.folder is None and preset.spec is not None and preset.spec.preset is not None


# ------------------------------------------------------------------------------------------- plan
def test_plan_takes_preset_colon_branch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", f"{PRESET}:group_size_128g", "--gpus", "2x80GB", "--json"]) == 0
    grouped = json.loads(capsys.readouterr().out)
    assert main(["plan", PRESET, "--branch", "group_size_128g", "--gpus", "2x80GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == grouped
    assert main(["plan", f"{PRESET}:main", "--gpus", "2x80GB", "--json"]) == 0
    main_branch = json.loads(capsys.readouterr().out)
    assert grouped["total_weight_bytes"] > main_branch["total_weight_bytes"]  # 128-groups add scales


@pytest.mark.parametrize(("source", "status", "message"), [
    ("/nonexistent", 1, "/nonexistent: no such folder; give the checkpoint folder (the one holding config.json) "
                        "or a preset name"),
    ("no-such-model", 2, "unknown preset 'no-such-model' and no folder of that name (known presets: "),
    ("org/model", 1, "org/model: no folder ./model (where `gptq-tools download org/model` puts it)"),
    (f"{PRESET}:nope", 2, f"preset {PRESET!r} has no branch 'nope'; known: main, group_size_128g"),
])
def test_plan_wrong_source(source: str, status: int, message: str, capsys: pytest.CaptureFixture[str],
                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert error_of(capsys, ["plan", source, "--gpus", "2x80GB"], status).startswith(message)


def test_plan_of_a_weight_file_asks_for_its_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\0" * 8)
    monkeypatch.chdir(tmp_path)
    message = error_of(capsys, ["plan", "ckpt/model.safetensors", "--gpus", "2x80GB"], 1)
    assert message == ("ckpt/model.safetensors is a file; give the checkpoint folder (the one holding config.json) "
                       "or a preset name, e.g. the folder it is in (ckpt)")
    message = error_of(capsys, ["plan", "model.safetensors", "--gpus", "2x80GB"], 1)  # not ".: no config.json"
    assert message.startswith("model.safetensors: no such folder")


# --------------------------------------------------------------------------------- generate / split
def test_generate_wrong_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"\0" * 8)
    assert error_of(capsys, ["generate", "/nonexistent", "--prompt", "hi"], 1) == (
        "/nonexistent: no such folder; give the checkpoint folder (the one holding config.json) or a preset name")
    assert error_of(capsys, ["generate", "weights.safetensors", "--prompt", "hi"], 1).startswith(
        "weights.safetensors is a file; give the checkpoint folder")
    assert error_of(capsys, ["generate", PRESET, "--prompt", "hi"], 1) == (
        f"{PRESET}: no folder ./bloomz-176B-GPTQ (where `gptq-tools download {PRESET}` puts it); download it "
        f"first, or give the checkpoint folder")


def test_split_and_reshard_of_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert error_of(capsys, ["split", str(tmp_path), "--max-size", "1MiB"], 1) == (
        f"{tmp_path} is a folder; give the file to split, not a folder")
    assert error_of(capsys, ["reshard", str(tmp_path)], 1) == (
        f"{tmp_path} is a folder; give the safetensors file to reshard, not a folder")
    assert error_of(capsys, ["split", str(tmp_path / "gone.bin"), "--max-size", "1MiB"], 1) == (
        f"{tmp_path / 'gone.bin'}: no such file; give the file to split")


def test_path_errors_are_the_builtin_ones_too(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(IsADirectoryError):
        require_file(tmp_path)
    with pytest.raises(NotADirectoryError):
        require_folder(tmp_path / "f")
    with pytest.raises(FileNotFoundError):
        require_folder(tmp_path / "missing")
    assert issubclass(NotAFileError, GptqToolsError) and issubclass(NotAFolderError, GptqToolsError)


def test_presets_come_from_the_package_or_the_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert {PRESET, "opt-iml-30b"} <= set(list_presets())
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "mine.json").write_text(json.dumps({"name": "mine", "repo_id": "me/mine"}))
    monkeypatch.setenv("GPTQ_TOOLS_CONFIGS", str(tmp_path))
    assert list_presets() == ["mine"]
    assert parse_model_spec("mine").repo_id == "me/mine"


def test_inspect_takes_a_model_name(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert error_of(capsys, ["inspect", f"{PRESET}:group_size_128g"], 1) == (
        f"{PRESET}:group_size_128g: no folder ./bloomz-176B-GPTQ-group_size_128g (where `gptq-tools download "
        f"{PRESET}:group_size_128g` puts it); download it first, or give the checkpoint folder")
    (tmp_path / "model").mkdir()
    main(["inspect", "org/model", "--json"])
    assert json.loads(capsys.readouterr().out)["path"] == "model"
