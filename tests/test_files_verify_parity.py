"""``verify -c`` against the real ``sha256sum -c`` on a corpus of manifests: same stdout, stderr, exit status.

Each case runs GNU coreutils' ``sha256sum`` and ours side by side in one folder (stderr compared with the
program name prefix swapped). Ours runs in-process through :func:`gptq_tools.cli.main` so the corpus is
cheap; one case also goes through the real console entry point.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptq_tools.cli import main
from gptq_tools.files.manifest import unescape_name

from .helpers import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs GNU coreutils' sha256sum")

ENV = {**os.environ, "LC_ALL": "C.UTF-8"}
FILES: dict[bytes, bytes] = {
    b"a.bin": b"abc",
    b"b.bin": b"hello\n" * 1000,
    b"sp ace.bin": b"space",
    b"n\xffx.bin": b"not utf-8",
    b"back\\slash": b"backslash",
    b"new\nline": b"newline",
    b"it's": b"apostrophe",
    b"caf\xc3\xa9": b"utf-8",
    b"x:y": b"colon",
}


def h(name: bytes) -> bytes:
    return hashlib.sha256(FILES[name]).hexdigest().encode()


BAD = b"0" * 64
A, B = h(b"a.bin"), h(b"b.bin")
MANIFESTS: dict[str, bytes] = {
    "good": b"".join(h(n) + b"  " + n + b"\n" for n in (b"a.bin", b"b.bin", b"sp ace.bin", b"caf\xc3\xa9", b"x:y")),
    "bad_hash": A + b"  a.bin\n" + BAD + b"  b.bin\n" + BAD + b"  x:y\n",
    "missing": A + b"  a.bin\n" + A + b"  gone.bin\n" + A + b"  gone with space\n" + A + b"  n\xffgone\n"
               + A + b"  it's gone\n",
    "malformed": b"garbage\n" + A + b"  a.bin\n" + A[:63] + b"  short\n" + A + b"\n" + B + b"x  b.bin\n"
                 + b"  # indented comment\n" + B + b"  b.bin\n" + A + b"  gone.bin\n",
    "crlf": A + b"  a.bin\r\n" + B + b" *b.bin\r\n" + b"# note\r\n\r\n",
    "binary": A + b" *a.bin\n" + B + b" *b.bin\n" + BAD + b" *sp ace.bin\n",
    "bsd": b"SHA256 (a.bin) = " + A + b"\nSHA256(b.bin)= " + B + b"\nSHA256 (sp ace.bin) =" + h(b"sp ace.bin")
           + b"\nSHA256 (a.bin) = " + BAD + b"\nSHA256 (x:y) = " + A + b" \nMD5 (a.bin) = " + A[:32] + b"\n"
           + b"\\SHA256 (back\\\\slash) = " + h(b"back\\slash") + b"\n",
    "nonutf8": h(b"n\xffx.bin") + b"  n\xffx.bin\n" + A + b"  n\xffx.bin\n" + A + b"  \xfe\xfd\n",
    "escaped": b"\\" + h(b"back\\slash") + b"  back\\\\slash\n" + b"\\" + h(b"new\nline") + b"  new\\nline\n"
               + b"\\" + A + b"  bad\\xescape\n" + b"\\" + A + b"  trailing\\\n" + BAD + b"  back\\slash\n"
               + b"\\" + BAD + b"  new\\nline\n" + b"\\" + A + b"  gone\\nname\n",
    "empty": b"",
    "only_comments": b"# one\n# two\n#" + A + b"  a.bin\n",
    "blank_lines": b"\n\n\r\n",
    "dupes": A + b"  a.bin\n" + A + b"  a.bin\n" + BAD + b"  a.bin\n",
    "reversed": A + b" a.bin\n" + B + b" b.bin\n" + A + b"  a.bin\n",
    "mixed": A + b"  a.bin\n" + A + b" a.bin\n",
    "upper": A.upper() + b"  a.bin\n",
    "whitespace": b"  \t" + A + b"  a.bin\n" + A + b"\ta.bin\n",
    "folder_entry": A + b"  sub\n" + A + b"  a.bin\n",
    "all_missing": A + b"  gone1\n" + A + b"  gone2\n",
    "no_newline": A + b"  a.bin",
    "apostrophes": h(b"it's") + b"  it's\n" + BAD + b"  it's\n",
    "empty_names": b"SHA256 () = " + A + b"\n" + A + b"  a.bin\n",
}
OPTIONS: list[list[str]] = [[], ["--quiet"], ["--status"], ["--warn"], ["--strict"], ["--ignore-missing"],
                            ["--warn", "--strict"], ["--ignore-missing", "--quiet"], ["--status", "--warn"],
                            ["--warn", "--quiet"], ["--strict", "--ignore-missing", "--warn"]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name, data in FILES.items():
        (Path(os.fsdecode(bytes(folder))) / os.fsdecode(name)).write_bytes(data)
    (folder / "sub").mkdir()
    for name, data in MANIFESTS.items():
        (folder / name).write_bytes(data)
    return folder


def _coreutils_version() -> tuple[int, ...]:
    if shutil.which("sha256sum") is None:
        return ()
    first = subprocess.run(["sha256sum", "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"(\d+)\.(\d+)", first.splitlines()[0] if first else "")
    return tuple(int(x) for x in match.groups()) if match else ()


#: coreutils 9.4 (commit 86614ba1, bug#64392) also escapes check lines whose name holds '\' or CR; we
#: print what Debian's 9.1 prints. On a newer sha256sum those lines are mapped back to 9.1's form.
NEWER_ESCAPING = _coreutils_version() >= (9, 4)


def _as_9_1(stdout: bytes) -> bytes:
    lines = []
    for line in stdout.split(b"\n"):
        name, sep, status = line.rpartition(b": ")
        unescaped = unescape_name(name[1:]) if name.startswith(b"\\") else None
        if sep and unescaped is not None and b"\n" not in unescaped:
            line = unescaped + sep + status
        lines.append(line)
    return b"\n".join(lines)


def theirs(args: list[str], cwd: Path, stdin: bytes = b"") -> tuple[bytes, bytes, int]:
    done = subprocess.run(["sha256sum", *args], cwd=cwd, input=stdin, capture_output=True, env=ENV, check=False)
    stdout = _as_9_1(done.stdout) if NEWER_ESCAPING and "-c" in args else done.stdout
    return stdout, done.stderr.replace(b"sha256sum: ", b"gptq-tools: "), done.returncode


def ours(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, stdin: bytes = b"") -> tuple[bytes, bytes, int]:
    out, err = io.BytesIO(), io.BytesIO()
    with monkeypatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        patch.setattr(sys, "stdout", io.TextIOWrapper(out, write_through=True))
        patch.setattr(sys, "stderr", io.TextIOWrapper(err, write_through=True))
        code = main(["verify", *args])
        return out.getvalue(), err.getvalue(), code


def test_corpus_matches_sha256sum(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    differences = []
    for manifest in MANIFESTS:
        for options in OPTIONS:
            args = ["-c", *options, manifest]
            expected = theirs(args, corpus)
            if ours(args, corpus, monkeypatch) != expected:
                differences.append((args, expected, ours(args, corpus, monkeypatch)))
    assert differences == []


@pytest.mark.parametrize("args", [
    ["-c", "good", "bad_hash", "missing"],
    ["-c", "reversed", "good"],  # sha256sum's "BSD reversed" choice carries over to the next manifest
    ["-c", "--quiet", "malformed", "empty", "only_comments"],
    ["-c", "--warn", "nonexistent", "good"],
    ["-c", "--status", "good", "dupes"],
    ["-c", "--ignore-missing", "all_missing", "good"],
])
def test_several_manifests(corpus: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    assert ours(args, corpus, monkeypatch) == theirs(args, corpus)


@pytest.mark.parametrize("args", [["-c"], ["-c", "-"], ["-c", "--warn", "-", "good"]])
def test_manifest_on_stdin(corpus: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    stdin = MANIFESTS["malformed"] + MANIFESTS["bad_hash"] + A + b"  -\n"
    assert ours(args, corpus, monkeypatch, stdin) == theirs(args, corpus, stdin)
    assert ours(args, corpus, monkeypatch, b"") == theirs(args, corpus, b"")


def test_hash_files_like_sha256sum(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [os.fsdecode(n) for n in FILES] + ["gone.bin", "sub"]
    assert ours(names, corpus, monkeypatch) == theirs(names, corpus)
    assert ours(["-"], corpus, monkeypatch, b"piped") == theirs(["-"], corpus, b"piped")


def test_console_entry_point_matches(corpus: Path) -> None:
    env = {**ENV, "PYTHONPATH": str(REPO_ROOT), "GPTQ_TOOLS_DISABLE_PROGRESS": "1"}
    args = ["-c", "--warn", "malformed", "escaped", "nonutf8"]
    done = subprocess.run([sys.executable, "-m", "gptq_tools", "verify", *args], cwd=corpus, capture_output=True,
                          env=env, check=False)
    assert (done.stdout, done.stderr, done.returncode) == theirs(args, corpus)
