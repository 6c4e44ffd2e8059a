#!/usr/bin/env python3
"""Differential fuzzing of ``verify -c`` against the machine's ``sha256sum -c`` (``make fuzz-verify``).

Runs --cases manifests (default 100,000) from the generator the test suite uses (``tests/verify_fuzz.py``)
with --seed (default: a fresh one, printed so a finding can be replayed), counts every disagreement
instead of stopping at the first, prints the counts (compared, agreed, disagreed, crashed) and the
first few findings, and exits 1 if anything but agreement was seen.
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.verify_fuzz import AGREE, build_corpus, cases, compare  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--show", type=int, default=5, help="findings printed in full")
    args = parser.parse_args()
    if shutil.which("sha256sum") is None:
        print("fuzz-verify: needs GNU coreutils' sha256sum", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    counts: collections.Counter[str] = collections.Counter()
    shown = 0
    started = time.monotonic()
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="fuzz-verify-") as folder:
        build_corpus(Path(folder))
        try:
            for number, case in enumerate(cases(seed, args.cases), start=1):
                outcome, detail = compare(case, Path(folder))
                counts[outcome] += 1
                if outcome != AGREE and shown < args.show:
                    shown += 1
                    print(f"case {number}: {outcome}, options {case.options}, manifest {case.manifest!r}\n"
                          f"  {detail!r}", flush=True)
                if number % 10_000 == 0:
                    print(f"{number} cases, {sum(counts.values()) - counts[AGREE]} findings, "
                          f"{time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
        except KeyboardInterrupt:  # Ctrl-C: still report what was compared
            interrupted = True
    compared = sum(counts.values())
    print(f"seed {seed}: {compared} manifests compared{' (interrupted)' if interrupted else ''}, {counts[AGREE]} "
          f"agreed, {counts['disagree']} disagreed, {counts['crash']} crashed ({time.monotonic() - started:.0f}s)")
    return 0 if counts[AGREE] == compared and not interrupted else 1


if __name__ == "__main__":
    sys.exit(main())
