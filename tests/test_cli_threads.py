"""``--threads`` / ``GPTQ_TOOLS_THREADS``: the compute threads of every command, a default that does not
collapse on a busy machine (physical cores, idle OpenMP workers sleeping), and the same bytes for any count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptq_tools import constants
from gptq_tools.checkpoint.tiny import TinySpec, build_tiny_model

from .helpers import REPO_ROOT, run_cli

PROBE = ("import os, sys; from gptq_tools.cli import _configure_threads; n = _configure_threads(sys.argv[1] or None); "
         "import torch; print(n, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])")


def probe(requested: str, **env: str) -> list[str]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("GPTQ_TOOLS_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", PROBE, requested], capture_output=True, text=True, check=True,
                          env={**environment, "PYTHONPATH": str(REPO_ROOT), **env})
    return done.stdout.split()


def test_threads_option_sets_torch_threads_and_passive_waiting() -> None:
    assert probe("1") == ["1", "1", "PASSIVE"]
    assert probe("2") == ["2", "2", "PASSIVE"]


def test_threads_from_the_environment_and_the_default() -> None:
    assert probe("", GPTQ_TOOLS_THREADS="2") == ["2", "2", "PASSIVE"]
    cores = str(constants.physical_cores())
    assert probe("") == [cores, cores, "PASSIVE"]
    assert probe("", OMP_WAIT_POLICY="ACTIVE")[2] == "ACTIVE"  # a user's own setting wins


def test_physical_cores_counts_each_core_once() -> None:
    assert 1 <= constants.physical_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("args,env,shown", [(("--threads", "0"), {}, "--threads '0'"),
                                            (("--threads", "two"), {}, "--threads 'two'"),
                                            ((), {"GPTQ_TOOLS_THREADS": "-1"}, "GPTQ_TOOLS_THREADS '-1'")])
def test_bad_thread_counts_are_one_line(args: tuple[str, ...], env: dict[str, str], shown: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    done = run_cli(*args, "plan", "bloomz-176b-gptq", "--gpus", "2x80GB")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"gptq-tools: error: {shown} is not a thread count; give a whole number of 1 or more "
                           "(e.g. --threads 2)\n")


def test_quantize_writes_the_same_bytes_for_any_thread_count(tmp_path: Path) -> None:
    """MKL's threaded Cholesky rounds differently per thread count; the solver factorizes on one thread, so
    the checkpoint is byte-identical with 1 and 2 threads (hidden 256: large enough for MKL to thread)."""
    model = build_tiny_model("opt", tmp_path / "fp16", spec=TinySpec(hidden=256, layers=1, heads=4, vocab_size=512,
                                                                     seqlen=64, batch=8, steps=20))
    sums = []
    for threads in ("1", "2"):
        done = run_cli("--threads", threads, "-q", "quantize", str(model), "-o", str(tmp_path / threads),
                       "--calibration", str(model / "train.txt"), "--nsamples", "16", "--seqlen", "64",
                       "--group-size", "32", "--desc-act", timeout=600)
        assert done.returncode == 0, done.stderr
        sums.append((tmp_path / threads / "SHA256SUMS").read_text())
    assert sums[0] == sums[1]
