"""``gptq-tools publish``: the dry-run listing, resharding and splitting under --max-file-size, the model card,
the refusals, and round trips through the test Hub (publish, then ``download`` and ``verify --remote``)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gptq_tools.checkpoint.eval_results import read_eval_results, save_eval_result
from gptq_tools.cli import main
from gptq_tools.files.safetensors_format import read_header
from gptq_tools.hub.publish import parse_publish_target, publish
from gptq_tools.units import format_size
from tests.helpers import sha256, snapshot, write_fake_gptq_checkpoint
from tests.hub_server import HubServer

pytestmark = pytest.mark.timeout(180)

TOKEN = "hf_valid_token"
WEIGHTS = "gptq_model-4bit-32g.safetensors"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with HubServer() as server:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.endpoint)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)  # the test Hub speaks LFS only
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = write_fake_gptq_checkpoint(tmp_path / "opt-gptq", layers=2, hidden=64)
    config = json.loads((folder / "config.json").read_text())
    config.update({"_name_or_path": "facebook/opt-125m", "architectures": ["OPTForCausalLM"]})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dry_run_lists_path_size_and_sha256_and_sends_nothing(model: Path, hub: HubServer,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(model)
    code, out, err = run(capsys, "publish", str(model), "me/opt-gptq:4bit-32g", "--dry-run")
    assert code == 0, err
    for name in ("config.json", "quantize_config.json", "tokenizer.json", WEIGHTS):
        size = (model / name).stat().st_size
        assert any(line.split()[-2:] == [name, "(folder)"] and sha256(model / name) in line
                   and line.strip().startswith(format_size(size) + "  ") for line in out.splitlines()), name
    assert "README.md  (generated)" in out and "SHA256SUMS  (generated)" in out
    assert out.rstrip().endswith("dry run: nothing written, nothing sent")
    assert hub.requests == [] and not (model.parent / "opt-gptq.publish").exists()
    assert snapshot(model) == before


def test_parts_beside_their_whole_file_are_not_published_twice(model: Path, hub: HubServer) -> None:
    """A downloaded folder keeps the parts beside the joined file (unless --delete-parts): publish sends the
    whole file once (split again only when it is over the cap), never the old parts as well."""
    data = (model / WEIGHTS).read_bytes()
    third = len(data) // 3 + 1
    parts = [f"gptq_model-4bit-32g.JOINBEFOREUSE.split-{c}.safetensors" for c in "abc"]
    for index, name in enumerate(parts):
        (model / name).write_bytes(data[index * third:(index + 1) * third])
    sent = [f.path_in_repo for f in publish(model, "me/opt-gptq", dry_run=True).plan.files]
    assert WEIGHTS in sent and not set(parts) & set(sent)
    (model / WEIGHTS).unlink()  # parts alone: they are what there is to publish
    sent = [f.path_in_repo for f in publish(model, "me/opt-gptq", dry_run=True).plan.files]
    assert set(parts) <= set(sent)


def test_split_keeps_every_file_under_the_cap_and_lists_the_joined_hash(model: Path, hub: HubServer, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    weights = model / WEIGHTS
    cap = weights.stat().st_size // 3 + 1
    code, out, err = run(capsys, "publish", str(model), "me/opt-gptq", "--max-file-size", str(cap), "--oversize",
                         "split", "--dry-run", "--json")
    assert code == 0, err
    assert "a bare number is bytes" in err  # under 1 MiB: almost surely a unit left out
    plan = json.loads(out)
    assert all(f["size"] <= cap for f in plan["files"])
    parts = [f for f in plan["files"] if f["origin"] == f"part of {WEIGHTS}"]
    assert [p["path"] for p in parts] == [f"gptq_model-4bit-32g.JOINBEFOREUSE.split-{c}.safetensors" for c in "abc"]
    data = weights.read_bytes()
    offsets = [0, cap, 2 * cap, len(data)]
    assert [p["sha256"] for p in parts] == [hashlib.sha256(data[a:b]).hexdigest() for a, b in zip(offsets, offsets[1:])]
    assert plan["joins"] == [{"output": WEIGHTS, "parts": [p["path"] for p in parts], "sha256": sha256(weights)}]
    assert WEIGHTS not in {f["path"] for f in plan["files"]}

    code, out, err = run(capsys, "publish", str(model), "me/opt-gptq", "--max-file-size", f"{cap}", "--oversize",
                         "split", "--staging-dir", str(tmp_path / "stage"))
    assert code == 0, err
    sums = (tmp_path / "stage" / "SHA256SUMS").read_text().splitlines()
    assert f"{sha256(weights)}  {WEIGHTS}" in sums
    staged = [f for f in json.loads(json.dumps(plan))["files"] if f["origin"] != "generated"]
    for item in staged:
        assert f"{item['sha256']}  {item['path']}" in sums
    assert f"{sha256(tmp_path / 'stage' / 'README.md')}  README.md" in sums
    joined = b"".join((tmp_path / "stage" / p["path"]).read_bytes() for p in parts)
    assert joined == data


def test_reshard_gives_valid_shards_under_the_cap_with_an_index(model: Path, hub: HubServer, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    weights = model / WEIGHTS
    cap = weights.stat().st_size // 2
    code, out, err = run(capsys, "publish", str(model), "me/opt-gptq", "--max-file-size", str(cap), "--staging-dir",
                         str(tmp_path / "stage"), "--json")
    assert code == 0, err
    result = json.loads(out)
    shards = [f for f in result["files"] if f["origin"] == f"shard of {WEIGHTS}"]
    assert len(shards) >= 3 and all(f["size"] <= cap for f in result["files"])
    original = read_header(weights)
    seen = {}
    for shard in shards:
        path = tmp_path / "stage" / shard["path"]
        assert sha256(path) == shard["sha256"]
        header = read_header(path)
        with open(path, "rb") as handle:
            for name, entry in header.tensors.items():
                handle.seek(entry.begin)
                seen[name] = handle.read(entry.nbytes)
    raw = weights.read_bytes()
    assert {n: raw[e.begin:e.begin + e.nbytes] for n, e in original.tensors.items()} == seen
    index = json.loads((tmp_path / "stage" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original.tensors)
    assert result["reshards"][0]["source"] == WEIGHTS and result["reshards"][0]["sha256"] == sha256(weights)


def test_reshard_refuses_a_tensor_larger_than_the_cap(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "publish", str(model), "me/opt-gptq", "--max-file-size", "2000", "--dry-run")
    assert code != 0
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"gptq-tools: error: {model / WEIGHTS}: a tensor of ") and "use --oversize split" in line


def test_card_shows_settings_download_join_verify_and_eval(model: Path, tmp_path: Path, hub: HubServer,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    report = {"model": str(model), "data": "/data/held-out.txt", "tokens": 4096, "windows": 2, "seqlen": 2048,
              "perplexity": 21.1234, "seconds": 3.0, "reference": "/models/opt", "reference_perplexity": 20.5678,
              "kl_divergence": 0.012345}
    save_eval_result(model, report)
    cap = (model / WEIGHTS).stat().st_size // 2 + 1
    code, _, err = run(capsys, "publish", str(model), "me/opt-gptq:4bit-32g", "--max-file-size", str(cap),
                       "--oversize", "split", "--staging-dir", str(tmp_path / "stage"))
    assert code == 0, err
    card = (tmp_path / "stage" / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "library_name: transformers" in front and "base_model: facebook/opt-125m" in front
    assert "- gptq" in front and "- 4-bit" in front and "pipeline_tag: text-generation" in front
    assert "| `bits` | 4 |" in card and "| `group_size` | 32 |" in card and "| `desc_act` | false |" in card
    assert "gptq-tools download me/opt-gptq --revision 4bit-32g" in card
    parts = [f"gptq_model-4bit-32g.JOINBEFOREUSE.split-{c}.safetensors" for c in "ab"]
    assert f"cat {' '.join(parts)} > {WEIGHTS}" in card
    assert f"COPY /B {' + '.join(parts)} {WEIGHTS}" in card
    assert f"{sha256(model / WEIGHTS)}  {WEIGHTS}" in card
    assert "gptq-tools verify --remote me/opt-gptq:4bit-32g" in card and "sha256sum -c --ignore-missing" in card
    assert "| held-out.txt | 4096 | 2048 | 21.1234 | 20.5678 | 0.012345 |" in card
    assert "eval.json" in (tmp_path / "stage" / "SHA256SUMS").read_text()


def test_eval_results_replace_the_same_measurement_and_skip_damaged_ones(tmp_path: Path) -> None:
    first = {"model": "m", "data": "a.txt", "tokens": 10, "windows": 1, "seqlen": 8, "perplexity": 5.0,
             "seconds": 1.0, "reference": None, "reference_perplexity": None, "kl_divergence": None}
    save_eval_result(tmp_path, first)
    save_eval_result(tmp_path, {**first, "data": "b.txt"})
    save_eval_result(tmp_path, {**first, "perplexity": 4.0})
    assert [(r["data"], r["perplexity"]) for r in read_eval_results(tmp_path)] == [("b.txt", 5.0), ("a.txt", 4.0)]
    (tmp_path / "eval.json").write_text(json.dumps({"results": [{**first, "perplexity": "NaN"}, first]}))
    assert read_eval_results(tmp_path) == [first]


def test_the_folders_own_readme_is_kept_unless_asked(model: Path, tmp_path: Path, hub: HubServer,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (model / "README.md").write_text("# my own card\n")
    code, out, _ = run(capsys, "publish", str(model), "me/opt-gptq", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["card"] == "kept"
    readme = next(f for f in json.loads(out)["files"] if f["path"] == "README.md")
    assert readme["origin"] == "folder" and readme["sha256"] == sha256(model / "README.md")
    code, out, _ = run(capsys, "publish", str(model), "me/opt-gptq", "--dry-run", "--json", "--overwrite-card")
    assert json.loads(out)["card"] == "generated"


@pytest.mark.parametrize(("repo", "message"), [
    ("opt-gptq", "'opt-gptq' is not a repository to publish to; write it as NAMESPACE/NAME[:BRANCH]"),
    ("me/opt:a:b", "'me/opt:a:b' is not a repository to publish to"),
    ("me/opt:../x", "'../x' is not a branch name publish uses"),
    ("me/opt:-rf", "'-rf' is not a branch name publish uses"),
])
def test_bad_repository_names_are_refused(model: Path, repo: str, message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "publish", str(model), repo, "--dry-run")
    assert code != 0 and len(err.strip().splitlines()) == 1 and err.startswith(f"gptq-tools: error: {message}")


def test_a_folder_with_nothing_to_publish_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "publish", str(tmp_path / "empty"), "me/x", "--dry-run")
    assert code != 0
    assert err.strip() == (f"gptq-tools: error: {tmp_path / 'empty'}: nothing to publish: no *.safetensors weights "
                           f"(no files); give the folder that `gptq-tools quantize` or `download` wrote")
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"x")
    code, _, err = run(capsys, "publish", str(tmp_path / "empty"), "me/x", "--dry-run")
    assert code != 0 and "nothing to publish: no *.safetensors weights (pytorch_model.bin)" in err


def test_links_and_a_staging_folder_inside_are_refused(model: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "publish", str(model), "me/x", "--dry-run", "--staging-dir", str(model / "stage"))
    assert code != 0 and "the staging folder must be outside the model folder" in err
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    os.symlink(secret, model / "notes.txt")
    code, _, err = run(capsys, "publish", str(model), "me/x", "--dry-run")
    assert code != 0 and err.strip() == (f"gptq-tools: error: {model / 'notes.txt'} is a symbolic link; publish "
                                         f"uploads only the folder's own files (a link could send a file from "
                                         f"elsewhere): replace it with the file itself, or remove it")


def test_a_model_without_quantize_config_is_published_as_plain_safetensors(model: Path, tmp_path: Path,
                                                                           hub: HubServer) -> None:
    (model / "quantize_config.json").unlink()
    config = json.loads((model / "config.json").read_text())
    del config["quantization_config"]
    (model / "config.json").write_text(json.dumps(config))
    result = publish(model, "me/plain", staging_dir=tmp_path / "stage", dry_run=False)
    card = (tmp_path / "stage" / "README.md").read_text()
    assert "this is not a GPTQ checkpoint" in card and "| `bits`" not in card
    assert result.commit and hub.repos["me/plain"].branches["main"][WEIGHTS].sha256 == sha256(model / WEIGHTS)


def test_a_damaged_quantize_config_is_one_error_naming_it(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (model / "quantize_config.json").write_text("{not json")
    code, _, err = run(capsys, "publish", str(model), "me/x", "--dry-run")
    assert code != 0 and err.startswith(f"gptq-tools: error: {model / 'quantize_config.json'}: cannot read JSON")


# ------------------------------------------------------------------------------------------ round trips
def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def test_round_trip_publish_then_download_and_verify_remote(model: Path, tmp_path: Path, hub: HubServer,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(model)
    cap = (model / WEIGHTS).stat().st_size // 3 + 1
    code, out, err = run(capsys, "publish", str(model), "me/opt-gptq:4bit-32g", "--max-file-size", str(cap),
                         "--oversize", "split")
    assert code == 0, err
    assert out.startswith(f"published {model} to me/opt-gptq@4bit-32g: commit ")
    assert snapshot(model) == before  # the folder is only read
    assert not any(".gptq-tools-tmp" in p.name for p in (model.parent / "opt-gptq.publish").rglob("*"))
    served = hub.repos["me/opt-gptq"].branches["4bit-32g"]
    assert all(f.size <= cap for f in served.values())
    assert served["gptq_model-4bit-32g.JOINBEFOREUSE.split-a.safetensors"].sha256  # uploaded by LFS

    code, out, err = run(capsys, "verify", "--remote", "me/opt-gptq:4bit-32g")
    assert code == 0, out + err
    dest = tmp_path / "fresh"
    code, out, err = run(capsys, "download", "me/opt-gptq:4bit-32g", "--local-dir", str(dest), "--delete-parts")
    assert code == 0, err
    assert f"joined {WEIGHTS}: sha256 {sha256(model / WEIGHTS)} (matches SHA256SUMS in the repository)" in out
    got = _files(dest)
    for name, digest in _files(model).items():
        assert got[name] == digest, name
    code, out, err = run(capsys, "verify", "-c", str(dest / "SHA256SUMS"), "--ignore-missing")
    assert code == 0, out + err


def test_republish_to_the_same_branch_updates_cleanly(model: Path, tmp_path: Path, hub: HubServer,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cap = (model / WEIGHTS).stat().st_size // 3 + 1
    first = publish(model, "me/opt-gptq:v1", max_file_size=cap, oversize="split", staging_dir=tmp_path / "s1")
    again = publish(model, "me/opt-gptq:v1", max_file_size=cap, oversize="split", staging_dir=tmp_path / "s1")
    assert again.commit == first.commit and again.deleted == ()  # nothing changed: no empty commit
    (model / "tokenizer.json").write_text('{"version": "2.0"}')
    second = publish(model, "me/opt-gptq:v1", max_file_size=cap, staging_dir=tmp_path / "s2")  # reshard now
    assert second.commit != first.commit
    parts = [f"gptq_model-4bit-32g.JOINBEFOREUSE.split-{c}.safetensors" for c in "abc"]
    assert sorted(second.deleted) == sorted(parts)
    served = hub.repos["me/opt-gptq"].branches["v1"]
    assert not set(parts) & set(served) and "model.safetensors.index.json" in served
    assert served["tokenizer.json"].data == b'{"version": "2.0"}'
    code, out, err = run(capsys, "verify", "--remote", "me/opt-gptq:v1")
    assert code == 0, out + err
    dest = tmp_path / "fresh"
    code, _, err = run(capsys, "download", "me/opt-gptq:v1", "--local-dir", str(dest))
    assert code == 0, err
    assert not any("JOINBEFOREUSE" in name for name in _files(dest))
    assert _files(dest)["tokenizer.json"] == sha256(model / "tokenizer.json")


def test_an_interrupted_upload_resumes_sending_only_what_is_missing(model: Path, tmp_path: Path,
                                                                    hub: HubServer) -> None:
    cap = (model / WEIGHTS).stat().st_size // 3 + 1
    plan = publish(model, "me/opt-gptq:r", max_file_size=cap, oversize="split", staging_dir=tmp_path / "s",
                   dry_run=True).plan
    first_part = next(f for f in plan.files if f.path_in_repo.endswith("split-a.safetensors"))
    hub.lfs_objects[first_part.sha256] = (model / WEIGHTS).read_bytes()[:cap]  # sent by a run killed before its commit
    assert hub.requests == []
    publish(model, "me/opt-gptq:r", max_file_size=cap, oversize="split", staging_dir=tmp_path / "s")
    puts = [path for method, path, _ in hub.requests if method == "PUT"]
    assert f"/lfs-upload/{first_part.sha256}" not in puts and len(puts) == 2  # parts b and c only


def test_refused_token_is_one_line_naming_the_endpoint(model: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "publish", str(model), "me/x", "--token", "hf_wrong")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"gptq-tools: error: me/x:main: {hub.endpoint} refused the upload (HTTP 401")
    assert "a token with write access is needed" in err
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run(capsys, "publish", str(model), "me/x", "--token", TOKEN)  # --token works alone too
    assert code == 0, err


def test_a_server_without_xet_is_named_with_the_fix(model: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("hf_xet")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", False)
    code, _, err = run(capsys, "publish", str(model), "me/x")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert f"upload to {hub.endpoint} failed" in err and "set HF_HUB_DISABLE_XET=1" in err


def test_parse_publish_target() -> None:
    assert parse_publish_target("me/m") == ("me/m", "main")
    assert parse_publish_target("me/m:4bit-128g") == ("me/m", "4bit-128g")
    assert parse_publish_target("me/m", revision="b/c") == ("me/m", "b/c")
