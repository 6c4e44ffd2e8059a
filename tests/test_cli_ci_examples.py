"""``examples/ci/``: the GitHub Actions workflows' own ``run:`` steps, run against the test Hub."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

from tests.download_helpers import SeedData, blob, populate, sha256
from tests.hub_server import HubServer

from .helpers import REPO_ROOT

pytestmark = pytest.mark.timeout(180)

EXAMPLES = REPO_ROOT / "examples" / "ci"


def workflow(name: str) -> tuple[dict[str, str], dict[str, dict[str, object]]]:
    """The workflow's ``env`` and its one job's steps by id."""
    data = yaml.safe_load((EXAMPLES / name).read_text())
    (job,) = data["jobs"].values()
    return data["env"], {step["id"]: step for step in job["steps"] if "id" in step}


@pytest.fixture
def hub() -> Iterator[tuple[HubServer, SeedData]]:
    with HubServer() as server:
        seed = populate(server)
        weights, config = blob(200_000, 21), b'{"model_type": "opt"}'
        sums = f"{sha256(weights)}  model.safetensors\n{sha256(config)}  config.json\n".encode()
        server.add_repo("org/published", {"main": {"model.safetensors": weights, "config.json": config,
                                                   "SHA256SUMS": sums}})
        yield server, seed


def run_step(step: dict[str, object], env: dict[str, str], cwd: Path,
             server: HubServer) -> subprocess.CompletedProcess[str]:
    script = str(step["run"])
    assert "${{" not in script  # what the test runs is exactly what Actions runs: plain shell and env vars
    shim = cwd / "bin" / "gptq-tools"
    if not shim.exists():
        shim.parent.mkdir()
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m gptq_tools "$@"\n')
        shim.chmod(0o755)
    full = {**os.environ, **env, "HF_ENDPOINT": server.endpoint, "PYTHONPATH": str(REPO_ROOT),
            "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}", "GPTQ_TOOLS_DISABLE_PROGRESS": "1"}
    return subprocess.run(["bash", "-e", "-c", script], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=120, check=False)


def junit_counts(path: Path) -> tuple[str | None, str | None]:
    root = ElementTree.parse(path).getroot()
    return root.get("tests"), root.get("failures")


def test_publisher_workflow(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, _ = hub
    env, steps = workflow("publisher.yml")
    assert list(steps) == ["install", "verify"]
    assert steps["verify"]["env"] == {"HF_TOKEN": "${{ secrets.HF_TOKEN }}"}
    upload = next(s for s in yaml.safe_load((EXAMPLES / "publisher.yml").read_text())["jobs"]["verify"]["steps"]
                  if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["with"]["path"] == "${{ env.REPORT }}" and upload["if"] == "always()"
    env = {**env, "REPO": "org/published:main"}
    done = run_step(steps["verify"], env, tmp_path, server)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == ["model.safetensors: OK", "config.json: OK"]
    assert junit_counts(tmp_path / env["REPORT"]) == ("2", "0")
    failing = run_step(steps["verify"], {**env, "REPO": "org/split"}, tmp_path, server)
    assert failing.returncode == 1 and "no file was verified" in failing.stderr


def test_consumer_workflow(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    server, seed = hub
    env, steps = workflow("consumer.yml")
    assert list(steps) == ["install", "cache", "download", "verify"]
    assert steps["cache"]["with"]["path"] == "${{ env.MODEL_DIR }}"
    assert steps["download"]["if"] == "steps.cache.outputs.cache-hit != 'true'"
    env = {**env, "REPO": "org/split", "MODEL_DIR": "models/split"}
    download = run_step(steps["download"], env, tmp_path, server)
    assert download.returncode == 0, download.stderr
    first = run_step(steps["verify"], env, tmp_path, server)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "gptq_model-4bit--1g.safetensors: OK\n"
    assert junit_counts(tmp_path / env["REPORT"]) == ("1", "0")
    joined = tmp_path / "models" / "split" / "gptq_model-4bit--1g.safetensors"
    assert joined.read_bytes() == seed.split_whole
    with open(joined, "r+b") as handle:  # the cache came back damaged: the next run must fail
        handle.seek(1000)
        handle.write(b"\xff")
    second = run_step(steps["verify"], env, tmp_path, server)
    assert second.returncode == 1 and second.stdout == "gptq_model-4bit--1g.safetensors: FAILED\n"
    assert junit_counts(tmp_path / env["REPORT"]) == ("1", "1")


def test_consumer_workflow_on_a_repository_without_sha256sums(hub: tuple[HubServer, SeedData], tmp_path: Path) -> None:
    """TheBloke's layout: parts and small files, no SHA256SUMS; download writes one from what it verified."""
    server, seed = hub
    server.add_repo("org/nosums", {"main": {**seed.split_parts, "config.json": b'{"model_type": "opt"}'}})
    env, steps = workflow("consumer.yml")
    env = {**env, "REPO": "org/nosums", "MODEL_DIR": "models/nosums"}
    download = run_step(steps["download"], env, tmp_path, server)
    assert download.returncode == 0, download.stderr
    folder = tmp_path / "models" / "nosums"
    joined = "gptq_model-4bit--1g.safetensors"
    listed = dict(reversed(line.split("  ", 1)) for line in (folder / "SHA256SUMS").read_text().splitlines())
    assert listed == {**{name: sha256(data) for name, data in seed.split_parts.items()},
                      "config.json": sha256(b'{"model_type": "opt"}'), joined: sha256(seed.split_whole)}
    verify = run_step(steps["verify"], env, tmp_path, server)
    assert verify.returncode == 0, verify.stderr
    assert sorted(verify.stdout.splitlines()) == sorted(f"{name}: OK" for name in listed)
    assert junit_counts(tmp_path / env["REPORT"]) == (str(len(listed)), "0")
    with open(folder / joined, "r+b") as handle:
        handle.seek(500)
        handle.write(b"\x00" if handle.read(1) != b"\x00" else b"\x01")
    damaged = run_step(steps["verify"], env, tmp_path, server)
    assert damaged.returncode == 1 and f"{joined}: FAILED" in damaged.stdout
