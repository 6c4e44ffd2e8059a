"""The native kernel's C source on its own (``tests/native/int4_gemm_check.c``): every build this machine runs,
and the portable build for aarch64 under qemu-user where a cross compiler and qemu are installed (NEON code,
run on an x86 machine), against a plain scalar computation."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from gptq_tools.runtime.kernels import _native, cpu_int4_native

HERE = Path(__file__).resolve().parent
CHECK = HERE / "native" / "int4_gemm_check.c"


def build_and_run(compiler: str, flags: tuple[str, ...], out: Path, runner: tuple[str, ...] = ()) -> str:
    command = [compiler, *flags, "-I", str(_native.SOURCE_DIR), str(CHECK), "-o", str(out), "-lm"]
    built = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    done = subprocess.run([*runner, str(out)], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("build", cpu_int4_native.BUILDS, ids=lambda b: b.name.removeprefix("cpu-int4-"))
def test_each_build_matches_a_scalar_computation(build: cpu_int4_native.Build, tmp_path: Path) -> None:
    compiler = _native._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    if build.cpu_reason() is not None:
        pytest.skip(f"{build.name}: {build.cpu_reason()}")
    out = build_and_run(compiler, build.flags, tmp_path / "check")
    assert out == f"ok {build.name.removeprefix('cpu-int4-')} lanes={build.lanes} cases=36"


def test_portable_build_on_aarch64_under_qemu(tmp_path: Path) -> None:
    cross, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cross is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    if platform.machine().lower() in ("aarch64", "arm64"):
        pytest.skip("this machine is aarch64: the native builds above already ran here")
    out = build_and_run(cross, (*cpu_int4_native.PORTABLE.flags, "-static"), tmp_path / "check-aarch64",
                        runner=(qemu,))
    assert out == "ok portable lanes=4 cases=36"
    assembly = subprocess.run([cross, *cpu_int4_native.PORTABLE.flags, "-S", "-o", "-", "-I",
                               str(_native.SOURCE_DIR), str(CHECK)], capture_output=True, text=True, check=True)
    assert "fmla\tv" in assembly.stdout  # NEON vector FMAs, not scalar code
