"""``make gpu-check``: on a machine with a CUDA GPU, every ``gpu``-marked test and the GPU rows of the kernel
benchmark, then one summary. Sized to finish in under 8 minutes on one H100/H200.

Exit status 0 only when the tests pass and the benchmark's GPU goals are met; 2 without a CUDA device (nothing
was checked, which is not a pass).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench-out" / "kernels" / "results.json"


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing was checked")
        return 2
    device = torch.cuda.get_device_name(0)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GPTQ_TOOLS_DISABLE_PROGRESS": "1"}
    started = time.monotonic()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                            "--timeout=300", "tests"], cwd=REPO_ROOT, env=env, check=False)
    test_seconds = time.monotonic() - started
    started = time.monotonic()
    bench = subprocess.run([sys.executable, "scripts/bench_kernels.py", "--gpu-only"], cwd=REPO_ROOT, env=env,
                           check=False)
    bench_seconds = time.monotonic() - started
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    gpu_rows = [row for row in rows if row.get("section") == "gpu"]
    print(f"\ngpu-check on {device}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"  gpu tests: {'passed' if tests.returncode == 0 else f'FAILED (exit {tests.returncode})'} "
          f"({test_seconds:.0f} s)")
    print(f"  kernel benchmark: {len(gpu_rows)} GPU rows, {'goals met' if bench.returncode == 0 else 'goals MISSED'} "
          f"({bench_seconds:.0f} s)")
    for row in gpu_rows:
        print(f"    {row['kernel']:10s} {row['case']:40s} {row['speedup']:.2f}x fp16 nn.Linear")
    return 0 if tests.returncode == 0 and bench.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
