#!/usr/bin/env python3
"""Differential fuzzing of the safetensors validator against the reference reader (``make fuzz``).

Runs --cases fresh cases (default 100,000) from the generator the test suite uses
(``tests/safetensors_fuzz.py``), counts every disagreement instead of stopping at the first, and
prints the three classes: accepted by us but not by the reference, the reverse, and crashes (anything
but our typed error), plus cases over the per-case time/memory bound. Exits 1 if any is non-zero.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests.safetensors_fuzz import (  # noqa: E402
    AGREE,
    CRASH,
    OURS_ONLY,
    REFERENCE_ONLY,
    SLOW,
    cases,
    classify,
    reference_accepts,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000, help="number of cases (default 100000)")
    parser.add_argument("--seed", type=int, default=None, help="seed for a reproducible run (default: random)")
    parser.add_argument("--show", type=int, default=3, help="print up to this many examples per class")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # hypothesis warns about the long reprs of deep-nesting cases
    counts: collections.Counter[str] = collections.Counter()
    folder = Path(tempfile.mkdtemp(prefix="gptq-tools-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    path = folder / "case.safetensors"

    @settings(max_examples=args.cases, derandomize=False, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(blob=cases())
    def run(blob: bytes) -> None:
        outcome, detail = classify(blob, path)
        counts[outcome] += 1
        if outcome == AGREE and reference_accepts(path)[0]:
            counts["valid"] += 1
        if outcome != AGREE and counts[outcome] <= args.show:
            print(f"{outcome}: {detail[:300]}\n  case: {blob[:300]!r}", flush=True)
        done = sum(counts[k] for k in (AGREE, OURS_ONLY, REFERENCE_ONLY, CRASH, SLOW))
        if done % 10_000 == 0:
            print(f"... {done} cases, {done - counts[AGREE]} disagreements so far", file=sys.stderr, flush=True)

    started = time.perf_counter()
    (seed(args.seed)(run) if args.seed is not None else run)()
    elapsed = time.perf_counter() - started
    path.unlink(missing_ok=True)
    folder.rmdir()
    total = sum(counts[k] for k in (AGREE, OURS_ONLY, REFERENCE_ONLY, CRASH, SLOW))
    print(f"cases: {total} in {elapsed:.0f} s ({counts['valid']} valid files, the rest refused by both)")
    print(f"accepted by us but not by the reference: {counts[OURS_ONLY]}")
    print(f"accepted by the reference but not by us: {counts[REFERENCE_ONLY]}")
    print(f"crashes (not our typed error): {counts[CRASH]}")
    print(f"over the per-case time/memory bound: {counts[SLOW]}")
    return 1 if total != counts[AGREE] else 0


if __name__ == "__main__":
    sys.exit(main())
