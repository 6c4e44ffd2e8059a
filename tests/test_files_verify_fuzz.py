"""Differential fuzzing of ``verify -c`` against the machine's ``sha256sum -c`` (issue 19, class 9).

CI runs :data:`CI_CASES` generated manifests with a fixed seed and requires the same stdout, stderr and
exit status for every one; ``make fuzz-verify`` runs 100,000+ and counts (``scripts/fuzz_verify.py``).
The three coreutils behaviours this round fixed also have fixed cases here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .verify_fuzz import AGREE, Case, build_corpus, cases, compare

pytestmark = pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs GNU coreutils' sha256sum")

CI_CASES = 3000
CI_SEED = 19


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("verify-fuzz")
    build_corpus(folder)
    return folder


def test_verify_c_agrees_with_sha256sum_on_generated_manifests(corpus: Path) -> None:
    outcomes: dict[str, int] = {}
    findings = []
    for case in cases(CI_SEED, CI_CASES):
        outcome, detail = compare(case, corpus)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome != AGREE and len(findings) < 3:
            findings.append((case, detail))
    assert outcomes == {AGREE: CI_CASES}, findings


A = b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc"), a.bin


@pytest.mark.parametrize("manifest", [
    A + b"  a.bin\rgarbage\n",  # a lone CR is part of the line (the name), not a line end
    A + b"  gone\r" + A + b"  a.bin\n",  # ... so this is one line naming "gone\r<hash>  a.bin"
    A + b"  a.bin\r\r\n",  # one CR before the LF is dropped, the other stays in the name
], ids=["cr-then-garbage", "cr-joins-two-lines", "two-crs"])
def test_lone_cr_does_not_split_a_line(corpus: Path, manifest: bytes) -> None:
    assert compare(Case(manifest, ()), corpus) == (AGREE, None)


@pytest.mark.parametrize("name", [b"a.bin/", b"a.bin/.", b"a.bin//", b"sub/", b"sub/.", b"gone/", b"link/"])
def test_names_ending_in_a_slash_are_opened_as_written(corpus: Path, name: bytes) -> None:
    """A file named with a trailing ``/`` is "Not a directory" for sha256sum; it must not pass as the file."""
    assert compare(Case(A + b"  " + name + b"\n", ()), corpus) == (AGREE, None)
    assert compare(Case(A + b"  " + name + b"\n", ("--ignore-missing",)), corpus) == (AGREE, None)


@pytest.mark.parametrize("name", [b"it's\x02", b"\x01it's", b" it's\r", b"it's gone\x7f", b"\x7fa'a\x7f",
                                  b"'quoted'", b"it's\xff"])
def test_quoting_of_names_with_an_apostrophe_and_unprintable_ends(corpus: Path, name: bytes) -> None:
    assert compare(Case(A + b"  " + name + b"\n", ()), corpus) == (AGREE, None)
