"""Quantize a model with GPTQModel (run with the separate GPTQModel venv), for the side-by-side benchmark.

Usage: python gptqmodel_quantize.py MODEL_DIR OUT_DIR CALIB.safetensors --bits 4 --group-size 128
       [--desc-act] [--static-groups] [--sym/--asym] [--damp 0.01] [--mse 2.4] [--gptaq-alpha 0.25]
--mse N: GPTQModel's MSE-searched clipping (N is the error norm; 0 = off); --gptaq-alpha A: GPTAQ instead of
GPTQ (GPTQModel's ``GPTAQConfig(alpha=A)``; its default is 0.25).
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
    parser.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--mse", type=float, default=0.0)
    parser.add_argument("--gptaq-alpha", type=float, default=None)
    args = parser.parse_args()

    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from safetensors.torch import load_file

    ids = load_file(args.calibration)["input_ids"]
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    extra = {"gptaq": {"alpha": args.gptaq_alpha}} if args.gptaq_alpha is not None else {}
    if args.desc_act:
        extra["act_group_aware"] = False  # GPTQModel's group-aware reordering excludes desc_act
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, sym=args.sym,
                            damp_percent=args.damp, static_groups=args.static_groups, mse=args.mse, **extra)
    started = time.perf_counter()
    model = GPTQModel.load(args.model_dir, config, device="cpu")
    model.quantize(calibration, batch_size=1, backend=BACKEND.TORCH, calibration_sort=None)
    seconds = time.perf_counter() - started
    model.save(args.out_dir)
    print(json.dumps({"seconds": seconds, "out": args.out_dir}))


if __name__ == "__main__":
    main()
