"""Full disks and file-size limits (issue 19): every write checks its count, nothing partial is published.

``download``, ``join``, ``split`` and ``quantize`` run as real CLI processes that write into a tiny
filesystem (a 96 KiB tmpfs, where this test may mount one) or under ``RLIMIT_FSIZE`` (any Linux): each
must exit non-zero with one error line and leave nothing at a final name. Python ignores ``SIGXFSZ``, so
an over-limit write returns a short count, then fails with ``EFBIG``: exactly the short write that used
to be taken for success.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gptq_tools.checkpoint.tiny import TinySpec, build_tiny_model
from gptq_tools.errors import InsufficientSpaceError
from gptq_tools.files.fileio import write_all
from tests.download_helpers import blob, safetensors_blob
from tests.hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parent.parent
LIMIT = 96 * 1024
pytestmark = pytest.mark.timeout(300)


@contextlib.contextmanager
def tiny_filesystem(folder: Path) -> Iterator[bool]:
    """Mount a 96 KiB tmpfs at ``folder``; yields False (nothing mounted) where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        yield False
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(folder)],
                             capture_output=True, check=False).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def run_cli(args: list[str], *, fsize: int | None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "gptq_tools", *args], capture_output=True, text=True,
                          env=environment, preexec_fn=limit, timeout=240, check=False)


def assert_failed_cleanly(result: subprocess.CompletedProcess, finals: list[Path]) -> None:
    err = result.stderr
    assert result.returncode != 0, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("gptq-tools: error: "), err
    for final in finals:
        assert not final.exists(), f"{final} was published: {err}"


@pytest.fixture(params=["rlimit-fsize", "tmpfs"])
def small_space(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, int | None]]:
    """``(folder to write into, RLIMIT_FSIZE or None)``."""
    if request.param == "rlimit-fsize":
        yield tmp_path / "out", LIMIT
        return
    with tiny_filesystem(tmp_path / "mnt") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root in a namespace that allows mounts)")
        yield tmp_path / "mnt" / "out", None


def test_full_disk_download_publishes_nothing(small_space: tuple[Path, int | None]) -> None:
    out, fsize = small_space
    data = blob(400_000, 41)
    with HubServer() as hub:
        hub.add_repo("org/m", {"main": {"model.safetensors": data}})
        result = run_cli(["download", "org/m", "--local-dir", str(out), "--no-space-check", "--max-workers", "2"],
                         fsize=fsize, env={"HF_ENDPOINT": hub.endpoint})
    assert_failed_cleanly(result, [out / "model.safetensors"])
    assert "downloaded and verified" not in result.stdout + result.stderr


def test_full_disk_join_publishes_nothing(small_space: tuple[Path, int | None], tmp_path: Path) -> None:
    out, fsize = small_space
    whole = safetensors_blob(300_000, 42)
    parts = tmp_path / "parts"
    parts.mkdir()
    for index, letter in enumerate("ab"):
        (parts / f"m.JOINBEFOREUSE.split-{letter}.safetensors").write_bytes(whole[index * 160_000:][:160_000])
    out.mkdir(parents=True, exist_ok=True)
    result = run_cli(["join", str(parts), "-o", str(out / "m.safetensors"), "--method", "readwrite",
                      "--sha256", hashlib.sha256(whole).hexdigest()], fsize=fsize)
    assert_failed_cleanly(result, [out / "m.safetensors"])


def test_full_disk_split_publishes_nothing(small_space: tuple[Path, int | None], tmp_path: Path) -> None:
    out, fsize = small_space
    source = tmp_path / "big.bin"
    source.write_bytes(blob(400_000, 43))
    result = run_cli(["split", str(source), "--max-size", "150000", "-o", str(out)], fsize=fsize)
    assert_failed_cleanly(result, [out / f"big.JOINBEFOREUSE.split-{x}.bin" for x in "abc"] + [out / "SHA256SUMS"])


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(hidden=64, layers=2, heads=2, vocab_size=512, seqlen=64, batch=8, steps=5)
    return build_tiny_model("opt", tmp_path_factory.mktemp("tiny") / "opt", spec=spec)


def test_full_disk_quantize_publishes_nothing(small_space: tuple[Path, int | None], tiny_opt: Path) -> None:
    out, fsize = small_space
    result = run_cli(["quantize", str(tiny_opt), "-o", str(out / "q"), "--calibration", str(tiny_opt / "train.txt"),
                      "--nsamples", "4", "--seqlen", "32", "--group-size", "32"], fsize=fsize)
    assert_failed_cleanly(result, [out / "q"])


@pytest.mark.parametrize("counts", [[3, 0], [1, 1, 1, 0]], ids=["then-zero", "byte-by-byte-then-zero"])
def test_short_write_loop_never_takes_a_short_count_for_done(counts: list[int], tmp_path: Path) -> None:
    """A writer that stores fewer bytes than asked and then none: every byte is retried, then it raises."""
    stored = bytearray()

    class Stingy:
        def __init__(self, plan: list[int]) -> None:
            self.plan = list(plan)

        def write(self, view: memoryview) -> int:
            count = min(self.plan.pop(0) if self.plan else 0, len(view))
            stored.extend(view[:count])
            return count

    write: Callable[[], None] = lambda: write_all(Stingy(counts), b"abcdefgh", target=tmp_path / "f")  # noqa: E731
    with pytest.raises(InsufficientSpaceError, match="f: the disk filled up while writing"):
        write()
    assert bytes(stored) == b"abcdefgh"[:sum(counts)]
