"""gptq_tools.hub: resolve, plan, transfer (faults, resume, verification) and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from typing import Self

from gptq_tools.errors import (
    ChecksumMismatchError,
    HubAuthError,
    HubError,
    IncompleteDownloadError,
    InsufficientSpaceError,
    OutputExistsError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UsageError,
)
from gptq_tools.hub import TransferOptions, download, parse_spec, plan_download
from gptq_tools.hub.state import STATE_DIR, LocalState
from tests.download_helpers import FAST, SeedData, blob, populate, sha256
from tests.hub_server import HubServer

pytestmark = pytest.mark.timeout(120)  # a transfer bug shows up as a hang: fail it instead


@pytest.fixture
def hub() -> tuple[HubServer, SeedData]:
    with HubServer() as server:
        yield server, populate(server)


def opts(**changes: object) -> TransferOptions:
    """Small chunks so that even these small files travel as several parallel ranges."""
    return TransferOptions(**{"max_workers": 4, "chunk_bytes": 64 * 1024, **FAST, **changes})


def fetch(server: HubServer, spec: str, folder: Path, **kwargs: object):
    kwargs.setdefault("options", opts())
    return download(spec, local_dir=folder, endpoint=server.endpoint, **kwargs)


def assert_folder(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, name
    leftovers = list((folder / STATE_DIR / "incomplete").glob("*"))
    assert leftovers == []


# -- resolving ----------------------------------------------------------------------------------------------
def test_parse_spec_forms() -> None:
    assert parse_spec("org/model") == parse_spec("org/model:main")
    assert parse_spec("org/model:dev").revision == "dev"
    assert parse_spec("org/model", revision="dev").revision == "dev"
    bloom = parse_spec("bloomz-176b-gptq:group_size_128g")
    assert (bloom.repo_id, bloom.revision) == ("TheBloke/bloomz-176B-GPTQ", "group_size_128g")
    assert bloom.preset is not None and parse_spec("bloomz-176b-gptq").revision == "main"


@pytest.mark.parametrize(("spec", "revision", "message"), [
    ("org/model:dev", "main", "give only one"),
    ("a:b:c", None, r"is not a repository; write it as NAMESPACE/NAME\[:BRANCH\]"),
    ("not a repo!", None, "neither a repository id"),
])
def test_parse_spec_rejects(spec: str, revision: str | None, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_spec(spec, revision=revision)


def test_every_request_is_pinned_to_the_resolved_commit(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    result = fetch(server, "org/model:dev", tmp_path / "dev")
    assert_folder(tmp_path / "dev", seed.model_dev)
    commit = server.repos["org/model"].commits["dev"]
    assert result.plan.repo.commit == commit
    after_refs = [path for method, path, _ in server.requests if not path.endswith("/refs")]
    assert after_refs and all(commit in path for path in after_refs)


# -- transfer -----------------------------------------------------------------------------------------------
def test_download_two_branches_verifies_every_file(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    result = fetch(server, "org/model", tmp_path / "main")
    assert_folder(tmp_path / "main", seed.model_main)
    assert sorted(result.downloaded) == sorted(seed.model_main)
    ranges = [r for _, _, r in server.resolve_requests("model.safetensors")]
    assert len(ranges) == 11 and "bytes=655360-699999" in ranges  # 700 kB in 64 KiB ranges
    fetch(server, "org/model", tmp_path / "dev", revision="dev")
    assert_folder(tmp_path / "dev", seed.model_dev)


def test_rerun_downloads_nothing(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, _ = hub
    fetch(server, "org/model", tmp_path)
    before = len(server.resolve_requests())
    again = fetch(server, "org/model", tmp_path)
    assert again.downloaded == () and len(server.resolve_requests()) == before


@pytest.mark.parametrize("fault", [
    {"kind": "drop", "after_bytes": 30_000, "times": 3},
    {"kind": "error500", "times": 2},
    {"kind": "stall", "after_bytes": 10_000, "seconds": 10},
])
def test_transient_faults_are_retried(hub: tuple[HubServer, SeedData], tmp_path: Path, fault: dict) -> None:
    server, seed = hub
    server.add_fault(pattern="model.safetensors", **fault)
    started = time.monotonic()
    fetch(server, "org/model", tmp_path, options=opts(stall_timeout=0.4))
    assert_folder(tmp_path, seed.model_main)
    assert server.faults[0].hits == fault.get("times", 1)
    assert time.monotonic() - started < 8  # a stall costs the stall timeout, not the stall


def test_429_waits_for_retry_after(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    server.add_fault("rate_limit", "model.safetensors", retry_after=1)
    started = time.monotonic()
    fetch(server, "org/model", tmp_path)
    assert time.monotonic() - started >= 1.0
    assert_folder(tmp_path, seed.model_main)


def test_too_many_failures_keep_the_partial_bytes(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    server.add_fault("error500", "model.safetensors", times=None)
    with pytest.raises(IncompleteDownloadError,
                       match=r"model.safetensors: gave up at byte 0 .*run the same command again"):
        fetch(server, "org/model", tmp_path, options=opts(retries=2))
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "config.json").read_bytes() == seed.model_main["config.json"]


def test_wrong_bytes_of_right_size_are_fetched_again(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    server.add_fault("corrupt", "model.safetensors", times=1)
    fetch(server, "org/model", tmp_path)
    assert_folder(tmp_path, seed.model_main)


def test_wrong_bytes_twice_report_both_hashes(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    server.add_fault("corrupt", "model.safetensors", times=None)
    expected = sha256(seed.model_main["model.safetensors"])
    message = rf"model.safetensors: downloaded twice .*have sha256 [0-9a-f]{{64}}, but the Hub lists {expected}"
    with pytest.raises(ChecksumMismatchError, match=message):
        fetch(server, "org/model", tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "config.json").exists()  # the other files still arrived


def test_small_git_files_are_checked_too(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, _ = hub
    server.add_fault("corrupt", "config.json", times=None)
    with pytest.raises(ChecksumMismatchError, match=r"config.json: .*git-sha1"):
        fetch(server, "org/model", tmp_path)
    assert not (tmp_path / "config.json").exists()


def _partial(tmp_path: Path, data: bytes, keep: int, *, flip: bool = False) -> Path:
    incomplete = LocalState(tmp_path).incomplete_path("model.safetensors", ("sha256", sha256(data)))
    incomplete.parent.mkdir(parents=True)
    prefix = bytearray(data[:keep])
    if flip:
        prefix[100] ^= 1
    incomplete.write_bytes(bytes(prefix))
    return incomplete


def test_resume_from_partial_bytes(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    data = seed.model_main["model.safetensors"]
    _partial(tmp_path, data, 500_000)
    plan = plan_download("org/model", local_dir=tmp_path, endpoint=server.endpoint)
    assert next(f for f in plan.files if f.remote.path == "model.safetensors").have_bytes == 500_000
    fetch(server, "org/model", tmp_path)
    assert_folder(tmp_path, seed.model_main)
    ranges = [r for _, _, r in server.resolve_requests("model.safetensors")]
    assert ranges[0] == "bytes=500000-565535" and not any(r.startswith("bytes=0-") for r in ranges)


def test_resume_is_not_trusted_blindly(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    _partial(tmp_path, seed.model_main["model.safetensors"], 500_000, flip=True)
    fetch(server, "org/model", tmp_path)
    assert_folder(tmp_path, seed.model_main)
    assert any(r == "bytes=0-65535" for _, _, r in server.resolve_requests("model.safetensors"))


def test_resume_when_the_server_ignores_range(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    _partial(tmp_path, seed.model_main["model.safetensors"], 500_000)
    server.add_fault("ignore_range", "*", times=None)
    fetch(server, "org/model", tmp_path)
    assert_folder(tmp_path, seed.model_main)
    assert len(server.resolve_requests("model.safetensors")) == 1  # one stream, not one per range


def test_progress_bar_counts_every_byte_once(hub: tuple[HubServer, SeedData], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    server, seed = hub
    totals: list[tuple[int, int]] = []

    class Bar:
        def __init__(self, total: int, desc: str, **_: object) -> None:
            self.total, self.n = total, 0

        def update(self, n: int) -> None:
            self.n += n

        def __enter__(self) -> Self:
            return self

        def __exit__(self, *exc: object) -> None:
            totals.append((self.total, self.n))

    monkeypatch.setattr("gptq_tools.hub.downloader.byte_bar", Bar)
    server.add_fault("corrupt", "model.safetensors", times=1)  # a restart must take its bytes back off the bar
    fetch(server, "org/model", tmp_path)
    size = sum(len(d) for d in seed.model_main.values())
    assert totals == [(size, size)]


# -- bad input ----------------------------------------------------------------------------------------------
def test_unknown_repo(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    with pytest.raises(RepoNotFoundError, match=r"repository 'org/nothing' not found .*check the name"):
        fetch(hub[0], "org/nothing", tmp_path)


def test_unknown_branch_lists_the_branches(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    with pytest.raises(RevisionNotFoundError, match=r"org/model has no branch or tag 'nope'; its branches: dev, main"):
        fetch(hub[0], "org/model:nope", tmp_path)


@pytest.mark.parametrize(("token", "status"), [(None, 401), ("hf_wrong", 403)])
def test_gated_repo_says_how_to_log_in(hub: tuple[HubServer, SeedData], tmp_path: Path, token: str | None,
                                       status: int) -> None:
    with pytest.raises(HubAuthError, match=rf"org/gated is gated: accept its conditions at .*hf auth login.*HF_TOKEN "
                                           rf"\(HTTP {status}\)"):
        fetch(hub[0], "org/gated", tmp_path, token=token or False)


def test_gated_repo_with_a_token(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    fetch(hub[0], "org/gated", tmp_path, token="hf_valid_token")
    assert (tmp_path / "model.safetensors").stat().st_size == 1000


def test_include_matching_nothing(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"org/model@main: no file matches --include \['\*.gguf'\].*the branch has: "
                                         r"README.md, config.json"):
        fetch(hub[0], "org/model", tmp_path, include=["*.gguf"])


def test_include_and_exclude(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    result = fetch(hub[0], "org/model", tmp_path, include=["*.json"], exclude=["tokenizer/*"])
    assert result.downloaded == ("config.json",)


def test_disk_too_small(hub: tuple[HubServer, SeedData], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gptq_tools.hub.plan.shutil.disk_usage", lambda _: type("U", (), {"free": 1000})())
    with pytest.raises(InsufficientSpaceError, match=r"needs .* to download \+ 878.91 KiB to join but only 1000 B is "
                                                     r"free; .*--no-space-check"):
        fetch(hub[0], "org/split", tmp_path)
    assert not tmp_path.joinpath("SHA256SUMS").exists()
    plan = fetch(hub[0], "org/split", tmp_path, dry_run=True).plan
    assert not plan.fits and plan.join_bytes == 900_000


def test_foreign_files_are_not_overwritten(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    (tmp_path / "config.json").write_bytes(b'{"mine": true}')
    with pytest.raises(OutputExistsError, match=r"config.json already exist\(s\) there but hold other bytes than "
                                                r"org/model@[0-9a-f]{12}; .*--force"):
        fetch(server, "org/model", tmp_path)
    assert (tmp_path / "config.json").read_bytes() == b'{"mine": true}'
    fetch(server, "org/model", tmp_path, force=True)
    assert_folder(tmp_path, seed.model_main)


def test_identical_files_already_present_are_adopted(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    (tmp_path / "model.safetensors").write_bytes(seed.model_main["model.safetensors"])
    result = fetch(server, "org/model", tmp_path)
    assert "model.safetensors" not in result.downloaded
    assert server.resolve_requests("model.safetensors") == []


def test_dry_run_writes_nothing(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    result = fetch(hub[0], "org/split", tmp_path / "out", dry_run=True)
    assert not (tmp_path / "out").exists() and hub[0].resolve_requests() == []
    data = json.loads(json.dumps(result.to_dict()))
    sums = hub[0].repos["org/split"].branches["main"]["SHA256SUMS"].size
    assert data["download_bytes"] == 900_000 + len(b"{}") + sums and data["join_bytes"] == 900_000
    assert data["joins"][0]["output"] == "gptq_model-4bit--1g.safetensors"
    assert data["joins"][0]["expected_from"] == "SHA256SUMS"


@pytest.mark.parametrize(("values", "message"), [
    (["xyz"], "expected 64 hex digits"),
    (["other.safetensors=" + "a" * 64], "not a joined file of this download"),
])
def test_bad_sha256_option(hub: tuple[HubServer, SeedData], tmp_path: Path, values: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        fetch(hub[0], "org/split", tmp_path, sha256=values, dry_run=True)


def test_parts_left_out_by_include(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--include/--exclude leave out parts .*split-c.safetensors; .*--no-join"):
        fetch(hub[0], "org/split", tmp_path, exclude=["*split-c*"], dry_run=True)
    plan = fetch(hub[0], "org/split", tmp_path, exclude=["*split-c*"], join=False, dry_run=True).plan
    assert plan.joins == ()


def test_max_workers_must_be_positive(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--max-workers must be at least 1"):
        download("org/model", local_dir=tmp_path, endpoint=hub[0].endpoint, max_workers=0)


# -- presets ------------------------------------------------------------------------------------------------
def test_preset_names_both_branches(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    plan = fetch(server, "bloomz-176b-gptq", tmp_path / "main", dry_run=True).plan
    assert plan.repo.repo_id == "TheBloke/bloomz-176B-GPTQ" and plan.repo.revision == "main"
    (join,) = plan.joins
    assert join.output == "gptq_model-4bit--1g.safetensors" and join.source == "preset bloomz-176b-gptq"
    assert join.expected_sha256 == "50baeab9859362d22df6f822f158b9ba75b44ffc6605b715992fe6245aa6e93a"
    assert [p[-13:] for p in join.parts] == ["a.safetensors", "b.safetensors", "c.safetensors"]
    fetch(server, "bloomz-176b-gptq:group_size_128g", tmp_path / "g128")
    assert (tmp_path / "g128" / "gptq_model-4bit-128g.safetensors").read_bytes() == seed.bloom_128g


def test_sha256_option_overrides_the_preset(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    plan = fetch(hub[0], "bloomz-176b-gptq", tmp_path, sha256=["B" * 64], dry_run=True).plan
    assert plan.joins[0].expected_sha256 == "b" * 64 and plan.joins[0].source == "--sha256"


def test_unequal_part_names_sort_by_length(tmp_path: Path) -> None:
    with HubServer() as server:
        parts = {f"w.JOINBEFOREUSE.split-{s}.bin": blob(10, i) for i, s in enumerate(["b", "a", "aa"])}
        server.add_repo("org/many", {"main": parts})
        plan = download("org/many", local_dir=tmp_path, endpoint=server.endpoint, dry_run=True).plan
    assert [p.rsplit("-", 1)[1] for p in plan.joins[0].parts] == ["a.bin", "b.bin", "aa.bin"]


def test_lfs_redirects_are_followed_without_leaking_the_token(tmp_path: Path) -> None:
    with HubServer(redirect_lfs=True) as server:
        populate(server)
        server.add_fault("drop", "model.safetensors", after_bytes=1000)  # resumes at the CDN too
        download("org/gated", local_dir=tmp_path, endpoint=server.endpoint, token="hf_valid_token", options=opts())
        cdn = [r for r in server.requests if r[1].startswith("/lfs-cdn/")]
    assert (tmp_path / "model.safetensors").stat().st_size == 1000 and len(cdn) >= 1


def test_offline_mode_is_explained(hub: tuple[HubServer, SeedData], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"org/model@main: HF_HUB_OFFLINE is set and .* holds no earlier download"):
        fetch(hub[0], "org/model", tmp_path)


def test_offline_rerun_checks_what_is_there(hub: tuple[HubServer, SeedData], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    server, seed = hub
    fetch(server, "org/model:dev", tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    before = len(server.requests)
    again = fetch(server, "org/model:dev", tmp_path)
    assert again.downloaded == () and again.plan.repo.commit == server.repos["org/model"].commits["dev"]
    (tmp_path / "config.json").unlink()
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE is set but config.json is missing from .*unset HF_HUB_OFFLINE"):
        fetch(server, "org/model:dev", tmp_path)
    assert len(server.requests) == before  # not a single request while offline


def test_range_ignored_then_dropped_mid_stream(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    server.add_fault("ignore_range", "model.safetensors", times=None)
    server.add_fault("drop", "model.safetensors", after_bytes=300_000, times=2)
    fetch(server, "org/model", tmp_path)
    assert_folder(tmp_path, seed.model_main)
    assert len(server.resolve_requests("model.safetensors")) == 3  # one stream, resumed twice


def test_disk_filling_up_mid_file(hub: tuple[HubServer, SeedData], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import gptq_tools.hub.transfer as transfer

    class FullDisk:
        def __init__(self, handle: object) -> None:
            self.handle, self.written = handle, 0

        def write(self, data: bytes) -> int:
            if self.written + len(data) > 200_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.handle.write(data)

        def __getattr__(self, name: str) -> object:
            return getattr(self.handle, name)

    real_open = open
    monkeypatch.setattr(transfer, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    with pytest.raises(InsufficientSpaceError, match=r"model.safetensors: the disk filled up while writing; nothing "
                                                     r"was written at the final name"):
        fetch(hub[0], "org/model", tmp_path, include=["model.safetensors"])
    assert not (tmp_path / "model.safetensors").exists()
