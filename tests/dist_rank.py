"""One rank of a distributed ``gptq-tools quantize`` started the way torchrun starts it (env vars), for tests.

Usage: python tests/dist_rank.py RECORD_DIR|- KILL_AT_LAYER|- -- CLI ARGS...
RECORD_DIR: every Hessian this rank solves is saved there as NAME.pt. KILL_AT_LAYER: this rank SIGKILLs
itself when it starts that layer (before its Hessians are reduced: mid-layer for the other ranks).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from gptq_tools.cli import main
from gptq_tools.quant import driver

torch.set_num_threads(1)
record, kill_at, rest = sys.argv[1], sys.argv[2], sys.argv[4:]
real_solve, real_layer = driver._quantize_linear, driver._quantize_layer


def recording_solve(name, W, H, config, method):  # noqa: ANN001, ANN201, N803 - mirrors the patched function
    torch.save(H.clone(), Path(record) / f"{name}.pt")
    return real_solve(name, W, H, config, method)


def killing_layer(source, index, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
    if index == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_layer(source, index, *args, **kwargs)


if record != "-":
    driver._quantize_linear = recording_solve
if kill_at != "-":
    driver._quantize_layer = killing_layer
sys.exit(main(rest))
