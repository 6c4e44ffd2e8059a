"""Benchmark: ``gptq-tools download`` vs ``huggingface_hub.snapshot_download`` from a local Hub.

Starts the test suite's Hub-compatible server on 127.0.0.1 with about 2 GB of random data (one large
file and several shards, served with ``sendfile``), downloads the same files with both clients, each in
its own process (so both pay the same interpreter start-up), and prints the times and the ratio.
gptq-tools also verifies the SHA256 of every file; snapshot_download checks sizes only.

Usage: ``python scripts/bench_download.py [--size-gb 2] [--rounds 2] [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.hub_server import HubServer  # noqa: E402 - after the path set-up above

BLOCK = 64 * 1024 * 1024


def make_files(folder: Path, total_bytes: int) -> dict[str, Path]:
    """One file of 60% of ``total_bytes`` and four shards sharing the rest, plus a config; random bytes."""
    sizes = {"gptq_model-4bit-128g.safetensors": int(total_bytes * 0.6)}
    shard = (total_bytes - sizes["gptq_model-4bit-128g.safetensors"]) // 4
    sizes.update({f"extra/shard-{i:05d}-of-00004.safetensors": shard for i in range(1, 5)})
    files: dict[str, Path] = {}
    for name, size in sizes.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            left = size
            while left > 0:
                handle.write(os.urandom(min(BLOCK, left)))
                left -= min(BLOCK, left)
        files[name] = path
    config = folder / "config.json"
    config.write_bytes(b'{"model_type": "bloom"}\n')
    files["config.json"] = config
    return files


def run_client(command: list[str], env: dict[str, str], out: Path) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one client process downloading into ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def check_same(a: Path, b: Path, files: dict[str, Path]) -> None:
    """Both downloads hold every file at its served size."""
    for name, source in files.items():
        size = source.stat().st_size
        if (a / name).stat().st_size != size or (b / name).stat().st_size != size:
            raise SystemExit(f"bench: {name} differs in size between the two downloads")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="total data size in GB (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best time of each counts")
    parser.add_argument("--max-workers", type=int, default=8, help="workers for both clients (default 8)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-download-", dir=args.workdir))
    try:
        started = time.perf_counter()
        files = make_files(workdir / "served", int(args.size_gb * 1e9))
        total = sum(p.stat().st_size for p in files.values())
        print(f"generated {total / 1e9:.2f} GB in {len(files)} files in {time.perf_counter() - started:.1f}s")
        with HubServer() as server:
            server.add_repo("bench/model", {"main": dict(files)})
            env = {**os.environ, "HF_ENDPOINT": server.endpoint, "PYTHONPATH": str(REPO_ROOT),
                   "HF_HOME": str(workdir / "hf"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   "GPTQ_TOOLS_DISABLE_PROGRESS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
            ours_cmd = [sys.executable, "-m", "gptq_tools", "download", "bench/model", "--local-dir",
                        str(workdir / "ours"), "--max-workers", str(args.max_workers), "--no-space-check"]
            snippet = ("import sys; from huggingface_hub import snapshot_download; "
                       "snapshot_download('bench/model', local_dir=sys.argv[1], max_workers=int(sys.argv[2]))")
            theirs_cmd = [sys.executable, "-c", snippet, str(workdir / "theirs"), str(args.max_workers)]
            ours, theirs = [], []
            for round_number in range(1, args.rounds + 1):
                theirs.append(run_client(theirs_cmd, env, workdir / "theirs"))
                ours.append(run_client(ours_cmd, env, workdir / "ours"))
                print(f"round {round_number}: snapshot_download {theirs[-1][0]:.2f}s (cpu {theirs[-1][1]:.2f}s), "
                      f"gptq-tools download {ours[-1][0]:.2f}s (cpu {ours[-1][1]:.2f}s)", flush=True)
            check_same(workdir / "ours", workdir / "theirs", files)
        (best_ours, cpu_ours), (best_theirs, cpu_theirs) = min(ours), min(theirs)
        print(f"snapshot_download (sizes checked only):     {best_theirs:.2f}s  {total / best_theirs / 1e9:.2f} GB/s  "
              f"cpu {cpu_theirs:.2f}s")
        print(f"gptq-tools download (every SHA256 checked): {best_ours:.2f}s  {total / best_ours / 1e9:.2f} GB/s  "
              f"cpu {cpu_ours:.2f}s")
        print(f"ratio snapshot_download time / gptq-tools time: {best_theirs / best_ours:.2f} "
              f"({'gptq-tools faster' if best_ours < best_theirs else 'snapshot_download faster'}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
