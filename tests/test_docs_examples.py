"""Documentation that cannot go stale: every ```console block in README.md and docs/*.md is run and its output
compared, and every other block that shows commands must be marked ``<!-- illustrative -->``.

A console block: lines starting with ``$ `` are commands (run with bash in one scratch folder per page, in
order, the page's blocks sharing it), the lines after a command are its expected output (stdout and stderr
together). In expected lines, ``<anything>`` in angle brackets stands for any text on that line (``<time>``,
``<commit>``, ``<free>``), and a line ``...`` for any number of lines. Download examples run against the test Hub
(``python -m tests.hub_server``, started here in-process with the same repositories).

Update a page after an intended change of output: ``python -m tests.test_docs_examples --show PAGE`` prints
what each command prints now.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.download_helpers import populate_docs
from tests.hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
MARK = "<!-- illustrative -->"
FENCE_RE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
COMMAND_RE = re.compile(r"^\s*(\$ |gptq-tools |make |python3? |torchrun |vllm |pip |git |hf |\.venv)")
PLACEHOLDER_RE = re.compile(r"<[a-z][a-z0-9 _-]*>")

pytestmark = pytest.mark.timeout(1800)  # a plan imports torch: ~5 s a command idle, a minute on a loaded machine


@dataclass(frozen=True)
class Example:
    page: Path
    line: int  # of the command, 1-based
    command: str
    expected: tuple[str, ...]


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    body: tuple[str, ...]
    illustrative: bool


def blocks(page: Path) -> Iterator[Block]:
    """Every fenced block of ``page`` (its lines dedented to the fence)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = FENCE_RE.match(lines[index])
        if not match:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith("```"):
            end += 1
        width = len(match["indent"])
        previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        yield Block(page, index + 1, match["lang"], tuple(x[width:] for x in lines[index + 1:end]), previous == MARK)
        index = end + 1


def examples(page: Path) -> list[Example]:
    """The commands of ``page``'s console blocks that are not marked illustrative, with their expected output."""
    found = []
    for block in blocks(page):
        if block.lang != "console" or block.illustrative:
            continue
        command: tuple[int, str] | None = None
        expected: list[str] = []
        for offset, text in enumerate(block.body):
            if text.startswith("$ "):
                if command is not None:
                    found.append(_example(page, command, expected))
                command, expected = (block.line + offset + 1, text[2:]), []
            elif command is not None:
                expected.append(text)
        if command is not None:
            found.append(_example(page, command, expected))
    return found


def _example(page: Path, command: tuple[int, str], expected: list[str]) -> Example:
    while expected and not expected[-1].strip():  # a blank line between two commands separates them
        expected.pop()
    return Example(page, command[0], command[1], tuple(expected))


def matches(expected: tuple[str, ...], actual: list[str]) -> bool:
    """Whether ``actual`` lines fit ``expected`` (``<placeholders>`` within a line, ``...`` lines)."""
    pattern = "".join(r"(?:[^\n]*\n)*?" if line.strip() == "..." else _line_pattern(line) + r"\n" for line in expected)
    return re.fullmatch(pattern, "".join(f"{line}\n" for line in actual)) is not None


def _line_pattern(line: str) -> str:
    parts = PLACEHOLDER_RE.split(line)
    return r"[^\n]+?".join(re.escape(part) for part in parts)


def workspace_env(root: Path, endpoint: str) -> dict[str, str]:
    shim = root / "bin" / "gptq-tools"
    if not shim.exists():
        shim.parent.mkdir(parents=True)
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m gptq_tools "$@"\n')
        shim.chmod(0o755)
    home = root / "home"
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}",
            "HF_ENDPOINT": endpoint, "HF_HOME": str(home / "hf"), "HOME": str(home),
            "GPTQ_TOOLS_DISABLE_PROGRESS": "1", "COLUMNS": "120", "HF_HUB_DISABLE_TELEMETRY": "1"}


def run_example(example: Example, cwd: Path, env: dict[str, str]) -> list[str]:
    done = subprocess.run(["bash", "-c", f"exec 2>&1\n{example.command}"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    return (done.stdout + done.stderr).splitlines()


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        populate_docs(server)
        yield server


def _page_id(page: Path) -> str:
    return str(page.relative_to(REPO_ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_console_examples_print_what_the_page_says(page: Path, hub: HubServer, tmp_path: Path) -> None:
    found = examples(page)
    if not found:
        pytest.skip(f"{_page_id(page)} has no console example (its command blocks are all illustrative)")
    (tmp_path / "work").mkdir()
    env = workspace_env(tmp_path, hub.endpoint)
    for example in found:
        actual = run_example(example, tmp_path / "work", env)
        where = f"{_page_id(page)}:{example.line}: $ {example.command}"
        assert matches(example.expected, actual), (f"{where}\nexpected:\n" + "\n".join(example.expected)
                                                   + "\nactual:\n" + "\n".join(actual))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_command_block_is_run_or_marked_illustrative(page: Path) -> None:
    unmarked = [f"{_page_id(page)}:{b.line}" for b in blocks(page) if b.lang != "console" and not b.illustrative
                and any(COMMAND_RE.match(line) for line in b.body)]
    assert not unmarked, f"command blocks neither ```console nor after {MARK}: {', '.join(unmarked)}"


def test_matching_rules() -> None:
    assert matches(("a <time> s", "..."), ["a 1.5 s", "x", "y"])
    assert matches(("first", "...", "last"), ["first", "last"])
    assert not matches(("a <time> s",), ["a 1.5 s", "extra"])
    assert not matches(("exact",), ["exactly"])
    assert matches(("<anything>",), ["some words"]) and not matches(("<anything>",), [""])


def test_blank_lines_separate_commands(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n\n```console\n$ a\none\n\n$ b\n```\n\n<!-- illustrative -->\n```console\n$ c\n```\n")
    assert [(e.command, e.expected) for e in examples(page)] == [("a", ("one",)), ("b", ())]


def test_the_documented_hub_command_starts_the_test_hub(tmp_path: Path) -> None:
    """``python -m tests.hub_server`` (what the docs tell readers to run) serves the examples' repositories."""
    process = subprocess.Popen([sys.executable, "-m", "tests.hub_server", "--port", "0"], cwd=REPO_ROOT,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline().strip()
        assert re.fullmatch(r"export HF_ENDPOINT=http://127\.0\.0\.1:\d+", first), first
        assert "org/nosums" in process.stdout.readline()
        env = workspace_env(tmp_path, first.split("=", 1)[1])
        done = subprocess.run(["gptq-tools", "download", "org/nosums", "--local-dir", str(tmp_path / "d")], env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "d" / "SHA256SUMS").is_file()
    finally:
        process.terminate()
        process.wait(timeout=30)


def _show(page: Path) -> None:
    """Print what each console example of ``page`` prints now (to update the page after an intended change)."""
    import tempfile

    with HubServer() as server, tempfile.TemporaryDirectory() as root:
        populate_docs(server)
        (Path(root) / "work").mkdir()
        env = workspace_env(Path(root), server.endpoint)
        for example in examples(page):
            print(f"$ {example.command}")
            print("\n".join(run_example(example, Path(root) / "work", env)))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--show":
        raise SystemExit("usage: python -m tests.test_docs_examples --show PAGE.md")
    _show(Path(sys.argv[2]).resolve())
