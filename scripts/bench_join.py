#!/usr/bin/env python3
"""Benchmark join and verify against cat && sha256sum, on the same files, in one run.

Builds a safetensors file of --size bytes split into three parts like the seed (45% / 45% / 10%),
then times, interleaved over --repeats rounds (median reported), each from a cold page cache when
this process may drop it (root), else warm:

  A  cat parts > out && sha256sum out          (what users do today)
  B  gptq-tools join parts --sha256 H          (join + verify, one pass, fsynced)
  F  cat parts > out && sync out               (the disk-bound floor for writing the file durably)
  C  cat parts | sha256sum                     (hash without writing)
  D  gptq-tools verify --parts parts --sha256 H

Goals (issue 2): A/B >= 2, C/D >= 3, B/F <= 1.3.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from gptq_tools.units import format_size, parse_size  # noqa: E402


def build_parts(folder: Path, total: int) -> tuple[list[Path], str]:
    """A valid safetensors file of about ``total`` bytes, written directly as three parts."""
    folder.mkdir(parents=True, exist_ok=True)
    tensor_bytes = 64 * 1024 * 1024
    count = max(1, total // tensor_bytes)
    header = {f"tensor.{i}": {"dtype": "U8", "shape": [tensor_bytes], "data_offsets": [i * tensor_bytes,
                                                                                       (i + 1) * tensor_bytes]}
              for i in range(count)}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 4096)
    prefix = len(raw).to_bytes(8, "little") + raw
    size = len(prefix) + count * tensor_bytes
    cuts = [0, int(size * 0.45) // 4096 * 4096, int(size * 0.90) // 4096 * 4096, size]
    names = [f"gptq_model-4bit--1g.JOINBEFOREUSE.split-{c}.safetensors" for c in "abc"]
    digest = hashlib.sha256()
    rng_block = os.urandom(tensor_bytes)
    stream_position = 0
    handles = [open(folder / n, "wb") for n in names]  # noqa: SIM115 - closed below
    try:
        def emit(data: bytes) -> None:
            nonlocal stream_position
            view = memoryview(data)
            while view:
                index = next(i for i in range(3) if cuts[i] <= stream_position < cuts[i + 1])
                take = min(len(view), cuts[index + 1] - stream_position)
                handles[index].write(view[:take])
                digest.update(view[:take])
                view, stream_position = view[take:], stream_position + take

        emit(prefix)
        for index in range(count):
            emit(index.to_bytes(8, "little") + rng_block[8:])
    finally:
        for handle in handles:
            handle.close()
    return [folder / n for n in names], digest.hexdigest()


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(command: list[str] | str, *, shell: bool = False) -> float:
    started = time.perf_counter()
    subprocess.run(command, shell=shell, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="3GiB", help="size of the joined file (default 3GiB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=REPO_ROOT / "bench-out" / "join")
    parser.add_argument("--keep", action="store_true", help="keep the generated parts")
    args = parser.parse_args()
    total = parse_size(args.size)
    folder: Path = args.dir
    shutil.rmtree(folder, ignore_errors=True)
    print(f"building {format_size(total)} of parts in {folder} ...", flush=True)
    parts, expected = build_parts(folder / "parts", total)
    size = sum(p.stat().st_size for p in parts)
    out = folder / "out.safetensors"
    names = " ".join(f"'{p}'" for p in parts)
    gptq = [sys.executable, "-m", "gptq_tools", "--no-progress"]
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env_path}" if env_path else str(REPO_ROOT)
    cases = {
        "A cat && sha256sum": (f"cat {names} > '{out}' && sha256sum '{out}'", True),
        "B gptq-tools join": ([*gptq, "join", *map(str, parts), "-o", str(out), "--sha256", expected], False),
        "B' join copy_file_range": ([*gptq, "join", *map(str, parts), "-o", str(out), "--sha256", expected,
                                     "--method", "copy_file_range"], False),
        "F cat && sync (floor)": (f"cat {names} > '{out}' && sync '{out}'", True),
        "F' cat (no sync)": (f"cat {names} > '{out}'", True),
        "C cat | sha256sum": (f"cat {names} | sha256sum", True),
        "D gptq-tools verify --parts": ([*gptq, "verify", "--parts", *map(str, parts), "--sha256", expected], False),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    cold = False
    for round_index in range(args.repeats):
        for name, (command, shell) in cases.items():
            out.unlink(missing_ok=True)
            cold = drop_caches()
            times[name].append(timed(command, shell=shell))
        print(f"round {round_index + 1}/{args.repeats}: " + ", ".join(f"{n.split()[0]} {t[-1]:.2f}s"
                                                                     for n, t in times.items()), flush=True)
    out.unlink(missing_ok=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{format_size(size)} in 3 parts, {args.repeats} rounds, page cache {'cold' if cold else 'WARM'}, "
          f"{os.cpu_count()} cores")
    for name, seconds in median.items():
        print(f"  {name:32s} {seconds:7.2f} s  {size / seconds / 1e9:5.2f} GB/s")
    ratios = {
        "join speed-up vs cat && sha256sum (goal >= 2)": median["A cat && sha256sum"] / median["B gptq-tools join"],
        "verify --parts speed-up vs cat | sha256sum (goal >= 3)":
            median["C cat | sha256sum"] / median["D gptq-tools verify --parts"],
        "join time / cat && sync (goal <= 1.3)": median["B gptq-tools join"] / median["F cat && sync (floor)"],
        "join time / cat without sync": median["B gptq-tools join"] / median["F' cat (no sync)"],
    }
    print()
    for name, value in ratios.items():
        print(f"  {name:56s} {value:5.2f}")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
