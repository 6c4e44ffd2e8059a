"""The publishing-step hook that kill-at-each-step tests rely on."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO_ROOT

SCRIPT = ("import sys; from pathlib import Path; from gptq_tools import fileio; d = Path(sys.argv[1]); "
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
