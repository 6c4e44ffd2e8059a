"""Differential fuzzing of ``verify -c`` against the machine's real ``sha256sum -c`` (issue 19).

A seeded generator writes manifests line by line from the pieces that make ``sha256sum -c`` branch:
hashes in every case and length (right, wrong, short, long, not hex), the separators (two spaces, space
star, one space, tabs), BSD tags with and without their blanks, leading-backslash escapes (good and bad),
LF, CRLF, a lone CR, no final newline, comments, blank lines, and names: present, missing, with blanks,
quotes, backslashes, newlines, unprintable and non-UTF-8 bytes, names ending in ``/``, ``/.`` or ``//``,
folders, symlinks to files and dangling ones. Each manifest is checked with a random option subset by
both programs in the same folder; stdout, stderr (program name swapped) and the exit status must match.

Used by ``tests/test_files_verify_fuzz.py`` (a few thousand cases, fixed seed) and
``scripts/fuzz_verify.py`` (``make fuzz-verify``: 100,000+ and counts).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ENV = {**os.environ, "LC_ALL": "C.UTF-8"}

#: The corpus every manifest refers to: name -> content (None: a folder; bytes starting with b"->": a link).
CORPUS: dict[bytes, bytes | None] = {
    b"a.bin": b"abc",
    b"b.bin": b"hello\n" * 100,
    b"empty": b"",
    b"sp ace": b"space",
    b"it's": b"apostrophe",
    b"'quoted'": b"quotes both ends",
    b"tab\there": b"tab",
    b"back\\slash": b"backslash",
    b"new\nline": b"newline",
    b"cr\rname": b"carriage return",
    b"\x01start": b"unprintable first",
    b"end\x7f": b"unprintable last",
    b"it's\x02": b"quote and unprintable",
    b"n\xffx": b"not utf-8",
    b"caf\xc3\xa9": b"utf-8",
    b"x:y": b"colon",
    b"sub": None,
    b"link": b"->a.bin",
    b"dangling": b"->nowhere",
}
OPTIONS = ["--quiet", "--status", "--warn", "--strict", "--ignore-missing"]
SEPARATORS = [b"  ", b" *", b" ", b"\t", b" \t", b"\t ", b"   "]
ENDINGS = [b"\n"] * 8 + [b"\r\n"] * 3 + [b"\r"] + [b"\r\r\n"] + [b""]
#: Names ending like this are opened as written (a file there is "Not a directory"). ".." is left out: names
#: with a ".." segment (or absolute) are refused on purpose, a documented difference (docs/hostile-input.md).
NAME_SUFFIXES = [b"/", b"/.", b"//", b"/./"]


def build_corpus(folder: Path) -> None:
    """Write :data:`CORPUS` into ``folder`` (names as bytes: some are not UTF-8)."""
    root = os.fsencode(folder)
    for name, content in CORPUS.items():
        path = os.path.join(root, name)
        if content is None:
            os.mkdir(path)
        elif content.startswith(b"->"):
            os.symlink(content[2:], path)
        else:
            with open(path, "wb") as handle:
                handle.write(content)


def _real_hash(name: bytes) -> bytes:
    content = CORPUS.get(name)
    if content is not None and content.startswith(b"->"):
        content = CORPUS.get(content[2:])
    data = content if isinstance(content, bytes) else b"missing"
    return hashlib.sha256(data).hexdigest().encode()


def _hash(rng: random.Random, name: bytes) -> bytes:
    digest = _real_hash(name) if rng.random() < 0.6 else hashlib.sha256(rng.randbytes(4)).hexdigest().encode()
    roll = rng.random()
    if roll < 0.1:
        digest = digest.upper()
    elif roll < 0.15:
        digest = bytes(c if rng.random() < 0.5 else c ^ 0x20 * (97 <= c <= 102) for c in digest)
    elif roll < 0.2:
        digest = digest[: rng.choice([0, 1, 32, 63])]
    elif roll < 0.24:
        digest = digest + rng.choice([b"0", b"ab", b"g"])
    elif roll < 0.28:
        position = rng.randrange(64)
        digest = digest[:position] + rng.choice([b"g", b"z", b" ", b"-"]) + digest[position + 1:]
    return digest


def _name(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.7:
        name = rng.choice(list(CORPUS))
    elif roll < 0.85:
        name = rng.choice([b"gone", b"gone with space", b"n\xffgone", b"it's gone", b"sub/none", b"-", b"x"])
    else:
        name = bytes(rng.choice(b"ab '\\\x01\x7f\xff\t.") for _ in range(rng.randint(1, 6)))
    if rng.random() < 0.12 and name[:1] not in (b" ", b"\t", b"*"):  # a blank could join the separator,
        name += rng.choice(NAME_SUFFIXES)  # leaving an absolute name such as "//"
    return b"/".join(b".x" if segment == b".." else segment for segment in name.split(b"/"))  # see NAME_SUFFIXES


def _escape(name: bytes) -> bytes:
    return name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def _line(rng: random.Random) -> bytes:
    name = _name(rng)
    digest = _hash(rng, name)
    lead = rng.choice([b"", b"", b"", b" ", b"\t", b"  "])
    escaped = rng.random() < 0.2 or (b"\n" in name and rng.random() < 0.9)
    if escaped:
        name = _escape(name) if rng.random() < 0.9 else name + rng.choice([b"\\x", b"\\", b"\\t"])
    elif b"\n" in name:
        name = name.replace(b"\n", b"")  # a raw newline would only split the line
    roll = rng.random()
    if roll < 0.2:
        tag = rng.choice([b"SHA256 (", b"SHA256(", b"SHA256  (", b"MD5 (", b"sha256 ("])
        close = rng.choice([b") = ", b")= ", b") =", b")=", b") = \t", b" ) = "])
        body = tag + name + close + digest + rng.choice([b"", b"", b" "])
    elif roll < 0.24:
        body = rng.choice([b"# comment", b"", b"garbage", b"  # indented", b"#" + digest + b"  a.bin"])
    else:
        body = digest + rng.choice(SEPARATORS) + name
    return lead + (b"\\" if escaped else b"") + body


@dataclass(frozen=True)
class Case:
    """One manifest and the options it is checked with."""

    manifest: bytes
    options: tuple[str, ...]


def cases(seed: int, count: int) -> Iterator[Case]:
    """``count`` cases from ``seed`` (the same seed gives the same cases)."""
    rng = random.Random(seed)
    for _ in range(count):
        lines = [_line(rng) + rng.choice(ENDINGS) for _ in range(rng.randint(1, 6))]
        manifest = b"".join(lines)
        options = tuple(option for option in OPTIONS if rng.random() < 0.2)
        yield Case(manifest, options)


def theirs(args: list[str], cwd: Path) -> tuple[bytes, bytes, int]:
    done = subprocess.run(["sha256sum", *args], cwd=cwd, capture_output=True, env=ENV, check=False)
    return done.stdout, done.stderr.replace(b"sha256sum: ", b"gptq-tools: "), done.returncode


@contextlib.contextmanager
def _captured(cwd: Path) -> Iterator[tuple[io.BytesIO, io.BytesIO]]:
    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdin, sys.stdout, sys.stderr, os.getcwd()
    wrappers = (io.TextIOWrapper(io.BytesIO(b"")), io.TextIOWrapper(out, write_through=True),
                io.TextIOWrapper(err, write_through=True))
    sys.stdin, sys.stdout, sys.stderr = wrappers
    os.chdir(cwd)
    try:
        yield out, err
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved[:3]
        os.chdir(saved[3])
        for wrapper in wrappers:  # detached, so collecting them later does not close the buffers
            with contextlib.suppress(ValueError):
                wrapper.flush()
            wrapper.detach()


def ours(args: list[str], cwd: Path) -> tuple[bytes, bytes, int]:
    """``gptq-tools verify ARGS`` in this process (the CLI, not a shortcut), output captured as bytes."""
    import logging

    from gptq_tools.cli import main

    package = logging.getLogger("gptq_tools")
    handlers, level, propagate = package.handlers[:], package.level, package.propagate
    try:
        with _captured(cwd) as (out, err):
            code = main(["verify", *args])
            sys.stdout.flush()
            sys.stderr.flush()
            return out.getvalue(), err.getvalue(), code
    finally:
        package.handlers[:], package.level, package.propagate = handlers, level, propagate


AGREE, DISAGREE, CRASH = "agree", "disagree", "crash"


def compare(case: Case, folder: Path) -> tuple[str, object]:
    """Run ``case`` through both programs; the outcome and, when they differ, both results."""
    (folder / "MANIFEST").write_bytes(case.manifest)
    args = ["-c", *case.options, "MANIFEST"]
    expected = theirs(args, folder)
    try:
        got = ours(args, folder)
    except Exception as exc:  # noqa: BLE001 - a crash is a finding, counted by the caller
        return CRASH, f"{type(exc).__name__}: {exc}"
    return (AGREE, None) if got == expected else (DISAGREE, (expected, got))
