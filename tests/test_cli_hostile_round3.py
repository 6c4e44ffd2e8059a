"""Tracebacks instead of one line, unbounded input, credentials on disk (issue 19, class 8): each case is
one error line and a non-zero exit, before anything is written or any work is done."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptq_tools.cli import main
from gptq_tools.hub.state import STATE_DIR
from tests.download_helpers import blob
from tests.hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = blob(20_000, 71)
pytestmark = pytest.mark.timeout(120)


def one_line(code: int, err: str, message: str, *, exit_code: int = 1) -> None:
    assert code == exit_code, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("gptq-tools: error: ") and message in last, err


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> HubServer:
    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        server.add_repo("org/m", {"main": {"model.safetensors": DATA, "sub/config.json": b"{}"}})
        yield server


def test_local_dir_that_is_an_existing_file(hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file"
    target.write_text("mine")
    code = main(["download", "org/m", "--local-dir", str(target)])
    one_line(code, capsys.readouterr().err, "--local-dir is an existing file, not a folder")
    assert target.read_text() == "mine"


def test_folder_where_the_repository_has_a_file(hub: HubServer, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out" / "model.safetensors").mkdir(parents=True)
    code = main(["download", "org/m", "--local-dir", str(tmp_path / "out")])
    one_line(code, capsys.readouterr().err, "is a folder, but the repository has a file 'model.safetensors' there")
    assert not hub.resolve_requests("model.safetensors")  # refused before any byte moved


def test_file_where_the_repository_needs_a_folder(hub: HubServer, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").write_text("a file")
    code = main(["download", "org/m", "--local-dir", str(tmp_path / "out")])
    one_line(code, capsys.readouterr().err, "sub: is a file, but the repository needs a folder there")


def test_credentials_in_hf_endpoint_are_never_saved_in_the_state_file(hub: HubServer, tmp_path: Path) -> None:
    from gptq_tools.hub import TransferOptions, download

    secret = hub.endpoint.replace("http://", "http://alice:s3cret-pass@")
    download("org/m", local_dir=tmp_path / "out", endpoint=secret, options=TransferOptions(max_workers=1))
    saved = (tmp_path / "out" / STATE_DIR / "resolved.json").read_text()
    assert "s3cret-pass" not in saved and "alice" not in saved
    assert json.loads(saved)["main"]["endpoint"] == hub.endpoint
    leaked = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and b"s3cret-pass" in p.read_bytes()]
    assert leaked == []


def test_split_into_an_absurd_number_of_parts_is_refused_unless_forced(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(blob(200_000, 72))
    code = main(["split", str(source), "--max-size", "10"])
    one_line(code, capsys.readouterr().err, "gives 20000 parts (more than 10000); a bare number is bytes",
             exit_code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


def test_reshard_into_more_shards_than_the_open_file_limit_is_one_line(tmp_path: Path) -> None:
    from gptq_tools.files.safetensors_format import build_header

    entries = [(f"t{i}", "U8", (16,)) for i in range(300)]
    header, _ = build_header(entries)
    source = tmp_path / "many.safetensors"
    source.write_bytes(header + bytes(16 * 300))
    script = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))\n"
              "from gptq_tools.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, "reshard", str(source), "-o", str(tmp_path / "out"),
                           "--max-shard-size", "16"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, check=False)
    one_line(done.returncode, done.stderr, "gives 300 shards, but this process may open only 128 files",
             exit_code=2)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("model-*"))


def test_quantize_into_a_symlink_to_an_empty_folder_fails_before_any_work(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    os.symlink(empty, tmp_path / "link")
    from gptq_tools.errors import OutputExistsError
    from gptq_tools.quant.save import check_output_folder

    with pytest.raises(OutputExistsError, match="link: is a symbolic link; the finished checkpoint is published"):
        check_output_folder(tmp_path / "link")


def test_interactive_prompt_line_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """``< /dev/zero`` is one endless line: it is refused at the bound, not read into memory."""
    from gptq_tools.cli import generate as cli_generate
    from gptq_tools.errors import UsageError

    class Endless(io.TextIOBase):
        def __init__(self) -> None:
            self.served = 0

        def readline(self, size: int = -1) -> str:
            assert 0 < size <= cli_generate.MAX_PROMPT_CHARS + 1  # never an unbounded read
            self.served += size
            return "\0" * size

        def isatty(self) -> bool:
            return False

    endless = Endless()
    monkeypatch.setattr("sys.stdin", endless)
    with pytest.raises(UsageError, match=f"a prompt line is longer than {cli_generate.MAX_PROMPT_CHARS} characters"):
        next(cli_generate._stdin_prompts())
    assert endless.served == cli_generate.MAX_PROMPT_CHARS + 1


# -- items 1 and 2 of issue 19 round 3 (helper A): disk offload of every module; configs that need code -----------
def _tiny_with_tokenizer(folder: Path, model_type: str):
    from tests.test_runtime_generate import save_tokenizer
    from tests.tiny_gptq import build_tiny_checkpoint

    built = build_tiny_checkpoint(folder, model_type, desc_act=True)
    save_tokenizer(built.folder)
    return built


@pytest.mark.parametrize("model_type", ["opt", "bloom"])
def test_generate_with_every_module_offloaded_to_disk_equals_the_in_memory_run(
        model_type: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tied head sent to disk with everything else used to die with ``KeyError: 'lm_head.weight'`` in accelerate."""
    import torch

    from gptq_tools.runtime.load import load_quantized

    checkpoint = _tiny_with_tokenizer(tmp_path / "ckpt", model_type)
    args = ["generate", str(checkpoint.folder), "--prompt", "w1 w5 w9", "--max-new-tokens", "5", "--dtype", "float32",
            "--json"]
    assert main([*args, "--max-memory", "cpu=1GiB"]) == 0
    in_memory = json.loads(capsys.readouterr().out)
    offload = tmp_path / "offload"
    assert main([*args, "--max-memory", "cpu=0GiB", "--offload-folder", str(offload)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    assert json.loads(captured.out)["token_ids"] == in_memory["token_ids"]
    # the head's weights are the embedding's file under the head's name, not a second copy
    embedding = {"opt": "model.decoder.embed_tokens", "bloom": "transformer.word_embeddings"}[model_type]
    assert os.path.samefile(offload / "lm_head.weight.dat", offload / f"{embedding}.weight.dat")

    ids = torch.tensor([[4, 8, 12, 5]])
    reference = load_quantized(checkpoint.folder, dtype=torch.float32, max_memory={"cpu": "1GiB"})(ids).logits
    on_disk = load_quantized(checkpoint.folder, dtype=torch.float32, max_memory={"cpu": 0},
                             offload_folder=tmp_path / "offload2")
    assert set(on_disk.gptq_placement.device_map.values()) == {"disk"}
    torch.testing.assert_close(on_disk(ids).logits, reference, rtol=1e-4, atol=1e-4)


def test_tied_head_alone_on_disk_is_written_from_its_owner(tmp_path: Path) -> None:
    """An explicit map that sends only the tied head to disk: its weights are taken from the CPU embedding."""
    import torch

    from gptq_tools.runtime.load import load_quantized

    checkpoint = _tiny_with_tokenizer(tmp_path / "ckpt", "opt")
    ids = torch.tensor([[4, 8, 12, 5]])
    reference = load_quantized(checkpoint.folder, dtype=torch.float32, device_map="cpu")(ids).logits
    model = load_quantized(checkpoint.folder, dtype=torch.float32, offload_folder=tmp_path / "off",
                           device_map={"": "cpu", "lm_head": "disk"})
    torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "off" / "lm_head.weight.dat").is_file()


REMOTE_CODE_CASES = {
    "unknown_model_type": ({"model_type": "frobnicator"},
                           "config.json: model_type 'frobnicator' is unknown to transformers"),
    "auto_map": ({"auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}},
                 "config.json: model_type 'opt' names remote code (auto_map); gptq-tools never runs code from a "
                 "repository: if this is a stock opt model, delete auto_map from the config"),
    "auto_map_unknown_type": ({"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}},
                              "config.json: model_type 'evil' names remote code (auto_map); gptq-tools never runs "
                              "code from a repository: gptq-tools supports the model types bloom,"),
    "trust_remote_code": ({"trust_remote_code": True},
                          "config.json: model_type 'opt' names remote code (trust_remote_code); gptq-tools never "
                          "runs code from a repository"),
}


def _folder_needing_code(tmp_path: Path, change: dict[str, object]) -> tuple[Path, Path]:
    """A checkpoint whose config asks for ``change``, with a module that leaves a mark if it is ever imported."""
    from tests.helpers import write_fake_gptq_checkpoint

    folder = write_fake_gptq_checkpoint(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    mark = tmp_path / "code-ran"
    (folder / "configuration_evil.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    return folder, mark


@pytest.mark.parametrize("case", sorted(REMOTE_CODE_CASES))
@pytest.mark.parametrize("command", ["plan", "generate"])
def test_config_naming_code_transformers_lacks_is_one_line(case: str, command: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    change, message = REMOTE_CODE_CASES[case]
    folder, mark = _folder_needing_code(tmp_path, change)
    before = (folder / "config.json").read_bytes()
    extra = ["--max-memory", "cpu=1GiB"] if command == "plan" else ["--prompt", "w1"]
    code = main([command, str(folder), *extra])
    one_line(code, capsys.readouterr().err, f"{folder / message}")
    assert not mark.exists()
    assert (folder / "config.json").read_bytes() == before


def test_preset_model_config_naming_remote_code_is_refused_by_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    shipped = REPO_ROOT / "configs" / "presets" / "bloomz-176b-gptq.json"
    preset = json.loads(shipped.read_text(encoding="utf-8"))
    preset["model_config"]["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "bloomz-176b-gptq.json").write_text(json.dumps(preset), encoding="utf-8")
    monkeypatch.setenv("GPTQ_TOOLS_CONFIGS", str(tmp_path))
    code = main(["plan", "bloomz-176b-gptq", "--gpus", "8x80GB"])
    one_line(code, capsys.readouterr().err, "preset bloomz-176b-gptq model_config: model_type 'bloom' names remote "
                                            "code (auto_map); gptq-tools never runs code from a repository")


def test_trust_remote_code_option_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    """There is no way to ask gptq-tools to run a repository's code."""
    with pytest.raises(SystemExit) as exited:
        main(["plan", "x", "--max-memory", "cpu=1GiB", "--trust-remote-code"])
    assert exited.value.code == 2
    assert "--trust-remote-code" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_quantize_and_eval_refuse_a_config_naming_remote_code(command: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder, mark = _folder_needing_code(tmp_path, REMOTE_CODE_CASES["auto_map"][0])
    text = tmp_path / "text.txt"
    text.write_text("some calibration text\n" * 20)
    if command == "quantize":  # an fp16 model folder: the same config without its quantization settings
        config = json.loads((folder / "config.json").read_text())
        del config["quantization_config"]
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "quantize_config.json").unlink()
        code = main(["quantize", str(folder), "-o", str(tmp_path / "out"), "--calibration", str(text)])
    else:
        code = main(["eval", str(folder), "--text", str(text)])
    one_line(code, capsys.readouterr().err, f"{folder / REMOTE_CODE_CASES['auto_map'][1]}")
    assert not mark.exists()
    assert not (tmp_path / "out").exists()


# -- quantize's work files: no link written through (item 5) ------------------------------------------------
QUANT_ARGS = ["--group-size", "32", "--nsamples", "4", "--seqlen", "32"]


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gptq_tools.checkpoint.tiny import TinySpec, build_tiny_model

    spec = TinySpec(hidden=64, layers=3, heads=2, vocab_size=256, seqlen=32, batch=4, steps=2)
    return build_tiny_model("opt", tmp_path_factory.mktemp("tiny") / "opt", spec=spec)


def interrupted_quantize(model: Path, output: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A quantize run (default method, fp-target) stopped right after layer 0 is committed; returns its work
    folder."""
    from gptq_tools.quant import driver

    real = driver._commit_layer

    def commit_then_stop(*args: object, **kwargs: object) -> None:
        real(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(driver, "_commit_layer", commit_then_stop)
        assert main(["quantize", str(model), "-o", str(output), "--calibration", str(model / "train.txt"),
                     *QUANT_ARGS]) == 130
    work = driver._staging_folder(output) / driver.WORK_DIR
    assert sorted(p.name for p in work.iterdir()) == ["inputs-00001.safetensors", "layer-00000.safetensors",
                                                      "reference-00001.safetensors", "state.json"]
    return work


def test_symlinks_planted_at_the_next_quantize_work_files_are_replaced_not_written_through(
        tiny_opt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Links at the names a resumed run writes next (its layer file, the next layer's inputs and fp-target's
    full-precision inputs) are replaced by the files (rename), as for every file published; their targets stay
    as they were, and the checkpoint is complete (that a resumed run gives the uninterrupted run's bytes is
    tests/test_quant_driver.py's)."""
    from gptq_tools.quant.save import finished_checkpoint

    resumed = tmp_path / "resumed"
    calibration = ["--calibration", str(tiny_opt / "train.txt")]
    work = interrupted_quantize(tiny_opt, resumed, monkeypatch)
    victims = {name: tmp_path / f"victim-{name}" for name in ("layer-00001.safetensors", "inputs-00002.safetensors",
                                                              "reference-00002.safetensors")}
    for name, victim in victims.items():
        victim.write_bytes(b"precious bytes that must survive\n")
        os.symlink(victim, work / name)
    os.symlink(tmp_path / "created-outside", work / "layer-00002.safetensors")  # dangling
    assert main(["quantize", str(tiny_opt), "-o", str(resumed), *calibration, *QUANT_ARGS, "--resume"]) == 0
    assert all(victim.read_bytes() == b"precious bytes that must survive\n" for victim in victims.values())
    assert not os.path.lexists(tmp_path / "created-outside")
    assert finished_checkpoint(resumed) is not None  # every file there matches its SHA256SUMS


def test_symlink_swapped_in_for_a_quantize_work_temporary_is_not_written_through(
        tiny_opt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The temporary a work file is written to swapped for a link after it was created (a race another user of
    the folder can win): the write fails in one line naming it, nothing reaches the link's target or the work
    file's name, and the run can still be resumed."""
    from gptq_tools.files import fileio

    output = tmp_path / "out"
    work = interrupted_quantize(tiny_opt, output, monkeypatch)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious bytes that must survive\n")
    real_temp_path_for = fileio.temp_path_for
    swapped: list[Path] = []

    def temp_then_link(final: Path) -> Path:
        temp = real_temp_path_for(final)
        if final.name == "layer-00001.safetensors":
            temp.unlink()
            os.symlink(victim, temp)
            swapped.append(temp)
        return temp

    monkeypatch.setattr(fileio, "temp_path_for", temp_then_link)
    args = ["quantize", str(tiny_opt), "-o", str(output), "--calibration", str(tiny_opt / "train.txt"), *QUANT_ARGS,
            "--resume"]
    code = main(args)
    one_line(code, capsys.readouterr().err, f"{swapped[0]}: is a symbolic link")
    assert victim.read_bytes() == b"precious bytes that must survive\n"
    assert not os.path.lexists(work / "layer-00001.safetensors") and not os.path.lexists(swapped[0])
    monkeypatch.setattr(fileio, "temp_path_for", real_temp_path_for)
    assert main(args) == 0 and (output / "SHA256SUMS").is_file()


@pytest.mark.parametrize("fault", ["unreachable", "listing-redirect-loop", "listing-too-large", "file-overlong"])
def test_credentials_in_hf_endpoint_never_appear_in_error_lines(fault: str, hub: HubServer, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Messages name the endpoint and the URL that failed, never the ``user:password@`` in ``HF_ENDPOINT``."""
    import socket

    endpoint = hub.endpoint
    if fault == "unreachable":
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
        monkeypatch.setattr("gptq_tools.hub.remote.METADATA_BACKOFF_S", 0.01)
    elif fault == "listing-redirect-loop":
        hub.add_fault("redirect_loop", "api:tree", times=None)
    elif fault == "listing-too-large":
        monkeypatch.setattr("gptq_tools.hub.remote.HUB_METADATA_MAX_BYTES", 1024)
        hub.add_fault("endless_body", "api:tree")
    else:  # the file's URL is named
        hub.add_fault("overlong", "model.safetensors", times=None)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint.replace("http://", "http://alice:s3cret-pass@"))
    code = main(["download", "org/m", "--local-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    one_line(code, err, endpoint.removeprefix("http://"))
    assert "s3cret-pass" not in err and "alice" not in err
