"""Quantize a model with GPTQModel (run with the separate GPTQModel venv), for the side-by-side benchmark.

Usage: python gptqmodel_quantize.py MODEL_DIR OUT_DIR CALIB.safetensors --bits 4 --group-size 128
       [--desc-act] [--sym/--asym] [--damp 0.01]
Prints one JSON line: {"seconds": quantization time, "out": OUT_DIR}.
Calibration is the exact token windows our quantizer used (an int tensor "input_ids" (n, seqlen)).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("calibration")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--damp", type=float, default=0.01)
    args = parser.parse_args()

    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from safetensors.torch import load_file

    ids = load_file(args.calibration)["input_ids"]
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, sym=args.sym,
                            damp_percent=args.damp)
    started = time.perf_counter()
    model = GPTQModel.load(args.model_dir, config, device="cpu")
    model.quantize(calibration, batch_size=1, backend=BACKEND.TORCH, calibration_sort=None)
    seconds = time.perf_counter() - started
    model.save(args.out_dir)
    print(json.dumps({"seconds": seconds, "out": args.out_dir}))


if __name__ == "__main__":
    main()
