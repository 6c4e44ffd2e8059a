"""The publishing-step hook, and kill-at-each-step proofs that join, split and reshard reruns repair a kill."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import (
    REPO_ROOT,
    kill_at_each_step,
    leftovers,
    random_model_file,
    run_cli,
    sha256,
    snapshot,
    split_bytes,
)

SCRIPT = ("import sys; from pathlib import Path; from gptq_tools.files import fileio; d = Path(sys.argv[1]); "
          "fileio.write_bytes_atomic(d / 'a', b'1'); fileio.unlink(d / 'a'); fileio.write_bytes_atomic(d / 'b', b'2')")


def _run(tmp_path, **env):
    full = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=full, capture_output=True, check=False)


def test_steps_are_logged_in_order(tmp_path):
    log = tmp_path / "steps.log"
    assert _run(tmp_path, GPTQ_TOOLS_STEP_LOG=str(log)).returncode == 0
    assert log.read_text().splitlines() == [f"replace {tmp_path / 'a'}", f"unlink {tmp_path / 'a'}",
                                            f"replace {tmp_path / 'b'}"]


def test_kill_lands_right_after_the_chosen_step(tmp_path):
    result = _run(tmp_path, GPTQ_TOOLS_KILL_AT_STEP="2")
    assert result.returncode == -9
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # 'a' written then removed; 'b' never written


def test_without_the_variables_nothing_is_logged_or_killed(tmp_path):
    assert _run(tmp_path).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# ---------------------------------------------------------------------------------------------------
# kill right after each publishing step of join, split and reshard; the rerun must repair it

PART_NAMES = [f"model.JOINBEFOREUSE.split-{c}.safetensors" for c in "abc"]


def _parts_setup(root: Path) -> None:
    source = random_model_file(root / "model.safetensors", tensors=6, size=32)
    split_bytes(source, root / "parts", (source.stat().st_size + 2) // 3)
    source.unlink()


def _expected_join_hash(tmp_path: Path) -> str:
    return sha256(random_model_file(tmp_path / "reference.safetensors", tensors=6, size=32))


def test_join_survives_a_kill_at_each_step(tmp_path: Path) -> None:
    expected = _expected_join_hash(tmp_path)
    steps = kill_at_each_step(_parts_setup, lambda root: ["join", str(root / "parts"), "--sha256", expected],
                              lambda root: snapshot(root / "parts"), base=tmp_path / "runs")
    assert [s.split()[0] + " " + Path(s.split()[1]).name for s in steps] == ["replace model.safetensors"]
    again = run_cli("join", str(tmp_path / "runs" / "clean" / "parts"), "--sha256", expected)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("already joined and verified: ") and f"SHA256 {expected} matches" in again.stdout


def test_join_delete_parts_survives_a_kill_at_each_step(tmp_path: Path) -> None:
    expected = _expected_join_hash(tmp_path)
    steps = kill_at_each_step(_parts_setup,
                              lambda root: ["join", str(root / "parts"), "--sha256", expected, "--delete-parts"],
                              lambda root: snapshot(root / "parts"), base=tmp_path / "runs")
    assert [s.split()[0] + " " + Path(s.split()[1]).name for s in steps] == [
        "replace model.safetensors", *(f"unlink {name}" for name in PART_NAMES)]
    assert snapshot(tmp_path / "runs" / "clean" / "parts") == {"model.safetensors": expected}


def _source_setup(root: Path) -> None:
    random_model_file(root / "model.safetensors", tensors=6, size=32)  # 6 tensors of 4 KiB


def test_split_survives_a_kill_at_each_step(tmp_path: Path) -> None:
    steps = kill_at_each_step(
        _source_setup, lambda root: ["split", str(root / "model.safetensors"), "--max-size", "8KiB", "-o",
                                     str(root / "parts")],
        lambda root: snapshot(root / "parts"), base=tmp_path / "runs")
    names = [f"model.JOINBEFOREUSE.split-{c}.safetensors" for c in "abcd"]
    assert [s.split()[0] + " " + Path(s.split()[1]).name for s in steps] == [
        *(f"replace {name}" for name in reversed(names)), "replace SHA256SUMS"]
    again = run_cli("split", str(tmp_path / "runs" / "clean" / "model.safetensors"), "--max-size", "8KiB", "-o",
                    str(tmp_path / "runs" / "clean" / "parts"))
    assert again.returncode == 0 and again.stdout.startswith("already split and verified: 4 parts"), again.stderr


def test_reshard_survives_a_kill_at_each_step(tmp_path: Path) -> None:
    steps = kill_at_each_step(
        _source_setup, lambda root: ["reshard", str(root / "model.safetensors"), "-o", str(root / "out"),
                                     "--max-shard-size", "10KB"],
        lambda root: snapshot(root / "out"), base=tmp_path / "runs")
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    kinds = [s.split()[0] + " " + Path(s.split()[1]).name for s in steps]
    assert kinds[:-1] == [*(f"replace {name}" for name in shards), "replace SHA256SUMS",
                          "replace model.safetensors.index.json"]
    assert kinds[-1].startswith("rmtree .gptq-tools-tmp-reshard.")
    clean = tmp_path / "runs" / "clean"
    again = run_cli("reshard", str(clean / "model.safetensors"), "-o", str(clean / "out"), "--max-shard-size", "10KB")
    assert again.returncode == 0 and again.stdout.startswith("already resharded and verified: 3 shard(s)")
    assert leftovers(clean) == []
