"""``gptq-tools download`` against a hostile Hub: bad names, bad oids, wrong shapes, redirect loops, lying sizes.

Every case: one error line, the exit code, nothing written outside the folder and nothing at a final
name inside it (for a bad listing: nothing written at all, the folder is not even created).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from gptq_tools.cli import main
from gptq_tools.errors import UnsafeNameError
from gptq_tools.files.names import check_no_clashes, validate_relative_name
from gptq_tools.hub import TransferOptions, download
from gptq_tools.hub.state import STATE_DIR
from tests.download_helpers import FAST, blob
from tests.hub_server import HubServer, make_file, tree_entry

pytestmark = pytest.mark.timeout(60)

GIT_OID = "a" * 40
SHA = "b" * 64
DATA = blob(5000, 21)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> HubServer:
    with HubServer() as hub:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.endpoint)
        hub.add_repo("org/evil", {"main": {"model.safetensors": DATA, "config.json": b"{}"}})
        yield hub


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, Path]:
    out = tmp_path / "box" / "out"
    code = main(["download", "org/evil", "--local-dir", str(out), *extra])
    return code, capsys.readouterr().err, out


def assert_one_line(code: int, err: str, message: str, *, exit_code: int = 1) -> None:
    """The error is one line, the last one (warnings logged before it are fine), with no traceback."""
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("gptq-tools: error: ") and "Traceback" not in err, err
    assert [line for line in lines if "error" in line] == lines[-1:], err
    assert re.search(message, lines[-1]), err


def written(tmp_path: Path) -> list[str]:
    return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))


def outside(tmp_path: Path) -> list[str]:
    """What was written anywhere but in the download folder."""
    return [p for p in written(tmp_path) if p not in ("box", "box/out") and not p.startswith("box/out/")]


def final_files(out: Path) -> list[str]:
    """Files at final names: everything except the state folder."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.is_file() and not p.relative_to(out).as_posix().startswith(".cache/"))


# -- names --------------------------------------------------------------------------------------------------
BAD_NAMES = [
    ("../../escaped", r"has a '\.\.' path segment"),
    ("a/../../../escaped", r"has a '\.\.' path segment"),
    ("{tmp}/abs", "is an absolute path"),
    ("C:escaped", "is a drive prefix on Windows"),
    ("a\\..\\..\\escaped", "contains a backslash"),
    ("a\x00b", "control character U\\+0000"),
    ("bell\x07", "control character U\\+0007"),
    ("\x85next-line", "control character U\\+0085"),
    ("\udc80", "lone surrogate"),
    ("", "it is empty"),
    (".", r"has a '\.' path segment"),
    ("a//b", "has an empty path segment"),
    ("a/./b", r"has a '\.' path segment"),
    ("trailing/", "has an empty path segment"),
    ("x" * 256, "longer than 255 bytes"),
    ("a/" * 2048 + "a", "more than 4096"),
    (".cache/huggingface/gptq-tools/download/verified.json", "lies where no Hub repository has files"),
    (".git/hooks/post-checkout", "lies where no Hub repository has files"),
    (".gptq-tools/download/verified.json", "lies where no Hub repository has files"),
    (".gptq-tools-tmp-config.json.1.x", "gptq-tools temporary name"),
]


@pytest.mark.parametrize(("name", "reason"), BAD_NAMES, ids=[repr(n[0])[:30] for n in BAD_NAMES])
def test_unsafe_hub_names_are_refused_before_anything_is_written(server: HubServer, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str], name: str,
                                                                 reason: str) -> None:
    name = name.replace("{tmp}", str(tmp_path))
    server.set_raw_tree("org/evil", "main", [tree_entry("config.json", 2, GIT_OID), tree_entry(name, 5000, GIT_OID)])
    code, err, _ = run(tmp_path, capsys)
    assert_one_line(code, err, r"org/evil@main: file .*" + reason + r".*; nothing was written")
    assert written(tmp_path) == []


@pytest.mark.parametrize(("names", "message"), [
    (["a", "a/b"], r"'a' is a file but 'a/b' needs it to be a folder"),
    (["same", "same"], r"'same' is listed twice"),
    (["...split-a", "...split-b"], r"the file that parts \.\.\.split-a, \.\.\.split-b\.\.\. join into, '\.\.'"),
    (["w.split-a.bin", "w.split-b.bin", "w.bin/x"], r"'w\.bin' is a file but 'w\.bin/x' needs it to be a folder"),
])
def test_listings_whose_names_clash(server: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    names: list[str], message: str) -> None:
    server.set_raw_tree("org/evil", "main", [tree_entry(n, 10, GIT_OID) for n in names])
    code, err, _ = run(tmp_path, capsys)
    assert_one_line(code, err, message)
    assert written(tmp_path) == []


def test_parts_that_join_into_a_listed_file(server: HubServer, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    names = ["w.split-a.bin", "w.split-b.bin", "w.bin"]
    server.set_raw_tree("org/evil", "main", [tree_entry(n, 10, GIT_OID) for n in names])
    code, err, _ = run(tmp_path, capsys)
    assert_one_line(code, err, r"join into w\.bin, which the repository also has as a file; pass --no-join",
                    exit_code=2)
    assert written(tmp_path) == []


def test_the_validator_accepts_ordinary_names() -> None:
    for name in ("model.safetensors", "tokenizer/vocab.json", "a b/c-d_e.f", "ünïcode/名前.bin", "...bin", "x" * 255):
        assert validate_relative_name(name, what="test") == name
    check_no_clashes(["a/b", "a/c", "ab", "a.b/c"], what="test")
    with pytest.raises(UnsafeNameError, match=r"test 5 is not a safe relative file name \(a name must be text"):
        validate_relative_name(5, what="test")  # type: ignore[arg-type]


# -- oids, sizes and shapes ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("entry", "message"), [
    (tree_entry("model.safetensors", 5000, GIT_OID, "../../../escaped/f"), r"LFS oid '\.\./\.\./\.\./escaped/f', "
                                                                           r"not a SHA256 \(64 lowercase hex"),
    (tree_entry("model.safetensors", 5000, GIT_OID, SHA.upper()), "LFS oid 'BBBB.*not a SHA256"),
    (tree_entry("model.safetensors", 5000, GIT_OID, SHA[:63]), "LFS oid 'b{63}', not a SHA256"),
    (tree_entry("config.json", 2, "../../escaped"), r"git oid '\.\./\.\./escaped', not 40 lowercase hex"),
    (tree_entry("config.json", "2", GIT_OID), r"'config.json' the size '2', which is not a byte count"),
    (tree_entry("config.json", -1, GIT_OID), "the size -1, which is not a byte count"),
    (tree_entry("config.json", 1.5, GIT_OID), "the size 1.5, which is not a byte count"),
    (tree_entry("config.json", True, GIT_OID), "the size True, which is not a byte count"),
    (tree_entry("model.safetensors", 5000, GIT_OID, SHA, lfs_size=6000), "5000 bytes but its LFS object 6000 bytes"),
    (tree_entry("config.json", 2, None), "git oid None"),
])
def test_malformed_listing_fields(server: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  entry: dict[str, object], message: str) -> None:
    server.set_raw_tree("org/evil", "main", [entry])
    code, err, _ = run(tmp_path, capsys)
    assert_one_line(code, err, r"org/evil@main: the listing gives .*" + message)
    assert written(tmp_path) == []


@pytest.mark.parametrize("listing", [
    {"not": "a list"},
    [5],
    [{"path": "config.json", "size": 2, "oid": GIT_OID}],
    [{"type": "file", "path": "config.json", "size": 2, "oid": GIT_OID, "lfs": "yes"}],
    b"<html>not json</html>",
], ids=["object", "number-entry", "no-type", "lfs-string", "not-json"])
def test_listing_of_the_wrong_shape(server: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    listing: object) -> None:
    server.set_raw_tree("org/evil", "main", listing)
    code, err, _ = run(tmp_path, capsys)
    assert_one_line(code, err, r"org/evil@main: the file listing from http://127\.0\.0\.1:\d+ is not in the shape "
                               r"the Hub API returns \(\w+(Error)?: .*\); check that HF_ENDPOINT")
    assert written(tmp_path) == []


@pytest.mark.parametrize(("refs", "message"), [
    ({"branches": "main", "tags": []}, r"the list of branches from http://127\.0\.0\.1:\d+ is not in the shape the "
                                      r"Hub API returns \(TypeError"),
    ({"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": "../../escaped"}], "tags": [],
      "converts": []},
     r"the Hub gives the commit '\.\./\.\./escaped', not 40 lowercase hex characters"),
])
def test_branches_of_the_wrong_shape(server: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     refs: object, message: str) -> None:
    server.repos["org/evil"].raw_refs = refs
    code, err, _ = run(tmp_path, capsys)
    assert_one_line(code, err, r"org/evil@main: " + message)
    assert written(tmp_path) == []


def test_a_listing_without_end(server: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gptq_tools.hub.remote.MAX_LISTED_ENTRIES", 50)
    server.repos["org/evil"].endless_tree = True
    code, err, _ = run(tmp_path, capsys)
    assert_one_line(code, err, r"org/evil@main: the file listing from http://127\.0\.0\.1:\d+ goes on past 50 entries; "
                               r"the server is paginating without end")
    assert written(tmp_path) == []


# -- redirects and lying sizes ------------------------------------------------------------------------------
def test_redirect_loop_on_a_file(server: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server.add_fault("redirect_loop", "model.safetensors", times=None)
    code, err, out = run(tmp_path, capsys)
    assert_one_line(code, err, r"model\.safetensors: http://127\.0\.0\.1:\d+/org/evil/resolve/[0-9a-f]{40}/"
                               r"model\.safetensors redirects in a loop \(more than 10 redirects")
    assert final_files(out) == ["config.json"] and outside(tmp_path) == []


def test_redirect_loop_on_the_listing(server: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server.add_fault("redirect_loop", "api:tree", times=None)
    code, err, _ = run(tmp_path, capsys)
    assert_one_line(code, err, r"org/evil@[0-9a-f]{40}: http://127\.0\.0\.1:\d+/api/models/org/evil/tree/.* redirects "
                               r"in a loop")
    assert written(tmp_path) == []


@pytest.mark.parametrize(("listed", "fault", "message"), [
    (6000, None, "listing says 6000 bytes but the server says the file has 5000 bytes"),
    (4000, None, "listing says 4000 bytes but the server says the file has 5000 bytes"),
    (6000, "ignore_range", "listing says 6000 bytes but the server sends 5000 bytes"),
    (None, "overlong", "listing says 5000 bytes but the server sends more"),
])
def test_lying_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                     listed: int | None, fault: str | None, message: str) -> None:
    with HubServer() as hub:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.endpoint)
        served = make_file("model.safetensors", DATA)
        served.listed_size = listed
        hub.add_repo("org/evil", {"main": {"model.safetensors": served, "config.json": b"{}"}})
        if fault is not None:
            hub.add_fault(fault, "model.safetensors", times=None)
        code, err, out = run(tmp_path, capsys)
    assert_one_line(code, err, rf"model\.safetensors: the Hub {message} \(http://.*\); the listing and the file "
                               rf"disagree, so it was not saved")
    assert final_files(out) == ["config.json"] and outside(tmp_path) == []
    assert all(p.stat().st_size <= 5000 for p in out.rglob("*.incomplete"))


# -- identical content --------------------------------------------------------------------------------------
def test_byte_identical_files_download_side_by_side(tmp_path: Path) -> None:
    files = {"a.safetensors": DATA, "copy/a.safetensors": DATA, "x.json": b'{"k": 1}', "y.json": b'{"k": 1}'}
    with HubServer() as hub:
        hub.add_repo("org/twins", {"main": files})
        listed = {f.path: f.sha256 or f.git_oid for f in hub.repos["org/twins"].branches["main"].values()}
        assert listed["a.safetensors"] == listed["copy/a.safetensors"] == hashlib.sha256(DATA).hexdigest()
        assert listed["x.json"] == listed["y.json"]
        download("org/twins", local_dir=tmp_path, endpoint=hub.endpoint,
                 options=TransferOptions(max_workers=4, chunk_bytes=1024, **FAST))
    assert {n: (tmp_path / n).read_bytes() for n in files} == files
    assert not (tmp_path / STATE_DIR / "incomplete").exists()
