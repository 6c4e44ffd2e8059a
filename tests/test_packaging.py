"""The wheel alone carries the presets: build it, install it into a fresh venv, plan BLOOMZ-176B from outside
the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The presets' source of truth: the top-level configs/presets/ (the wheel carries them inside the package).
PRESETS = sorted(p.name for p in (REPO_ROOT / "configs" / "presets").glob("*.json"))


def run(args: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the checkout (the build writes build/ and *.egg-info beside the sources)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.cfg", "setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for folder in ("gptq_tools", "configs"):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, "."],
        cwd=source)
    (built,) = out.glob("gptq_tools-*.whl")
    return built


def test_wheel_lists_every_preset(wheel: Path) -> None:
    assert len(PRESETS) >= 2 and not (REPO_ROOT / "gptq_tools" / "configs").exists()  # one copy: configs/
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"gptq_tools/configs/presets/{name}" for name in PRESETS} <= names
    # the native kernel's builds come from it at first use
    assert "gptq_tools/runtime/kernels/csrc/int4_gemm.c" in names


def test_fresh_venv_from_the_wheel_plans_bloomz(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], cwd=tmp_path)
    # torch, transformers, ... come from the test venv's site-packages, added as a plain path: its .pth files
    # (among them the editable install of this checkout) are not run, so gptq_tools can only come from the wheel
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path).stdout.strip())
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "GPTQ_TOOLS_CONFIGS", "VIRTUAL_ENV", "PYTHONHOME")}
    found = run([python, "-c", "import gptq_tools; print(gptq_tools.__file__)"], cwd=tmp_path, env=env).stdout
    assert Path(found.strip()).is_relative_to(venv)
    result = run([venv / "bin" / "gptq-tools", "plan", "bloomz-176b-gptq", "--max-memory", "0=60GiB,1=79GiB"],
                 cwd=tmp_path, env=env)
    lines = result.stdout.splitlines()
    assert lines[0] == "preset bloomz-176b-gptq: 87.16 GiB of weights, headroom for batch 1 x 2048 tokens"
    assert lines[2].split()[:2] == ["0", "60.00"] and "37 layers (0-36)" in lines[2]
    assert lines[-1] == "fits"
    # the installed package builds its native kernel from the C source it carries (the portable build: any CPU)
    from gptq_tools.runtime.kernels import cpu_int4_native

    if not isinstance(cpu_int4_native.PORTABLE.library(), str):
        probe = "from gptq_tools.runtime.kernels import cpu_int4_native as k; print(k.PORTABLE.library())"
        built = run([python, "-c", probe], cwd=tmp_path, env={**env, "GPTQ_TOOLS_CACHE_DIR": str(tmp_path / "c")})
        assert built.stdout.startswith("<CDLL") and str(tmp_path / "c") in built.stdout
