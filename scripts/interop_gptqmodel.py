"""Round-trip GPTQ checkpoints between GPTQModel and gptq-tools on CPU, comparing logits both ways.

Run with a Python that has GPTQModel installed (``.venv-gptqmodel/bin/python``, made by ``make venv-gptqmodel``):

1. GPTQModel quantizes a tiny random OPT (and BLOOM) and saves it; GPTQModel loads it back and
   gives logits; ``gptq_tools.load_quantized`` loads the same folder: the logits must agree.
2. gptq-tools' test checkpoint builder writes a checkpoint (v1 zero points, act-order); our loader and
   GPTQModel's loader load it: the logits must agree.

Prints one JSON line per case with the largest absolute logit difference and its tolerance; exit
status 1 when a case disagrees.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

VOCAB = 96


def save_tokenizer(folder: Path) -> None:
    """A whitespace word-level tokenizer (token ``wN`` is id ``N + 3``), enough for GPTQModel's loader."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                            bos_token="</s>").save_pretrained(folder)


def float_model(folder: Path, model_type: str) -> Path:
    """A random-init tiny float16 model with a tokenizer, saved for GPTQModel to quantize."""
    import torch
    from tiny_gptq import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, hidden=128, vocab=VOCAB)).to(torch.float16)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def gptqmodel_quantize(source: Path, out: Path, *, desc_act: bool) -> Path:
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    generator = torch.Generator().manual_seed(1)
    calibration = [{"input_ids": torch.randint(3, VOCAB, (32,), generator=generator).tolist(),
                    "attention_mask": [1] * 32} for _ in range(16)]
    config = QuantizeConfig(bits=4, group_size=32, desc_act=desc_act, sym=True)
    model = GPTQModel.load(str(source), config, device="cpu")
    model.quantize(calibration, batch_size=1, backend=BACKEND.TORCH, calibration_sort=None)
    model.save(str(out))
    save_tokenizer(out)
    return out


def gptqmodel_logits(folder: Path, ids: Any) -> Any:
    import torch
    from gptqmodel import BACKEND, GPTQModel

    # float16 on both sides: tighter than GPTQModel's CPU default bfloat16 (its torch kernel refuses float32)
    model = GPTQModel.load(str(folder), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    with torch.no_grad():
        return model.model(ids).logits.float(), model.model.get_input_embeddings().weight.dtype


def ours_logits(folder: Path, ids: Any, dtype: Any) -> Any:
    import torch

    from gptq_tools.runtime.load import load_quantized

    model = load_quantized(folder, dtype=dtype)
    with torch.no_grad():
        return model(ids).logits.float()


def compare(name: str, theirs: Any, ours: Any, dtype: Any) -> dict[str, Any]:
    import torch

    tolerance = 1e-4 if dtype == torch.float32 else 2e-2 if dtype == torch.float16 else 6e-2
    scale = float(theirs.abs().max())
    difference = float((theirs - ours).abs().max())
    return {"case": name, "dtype": str(dtype), "max_abs_diff": difference, "logit_scale": scale,
            "tolerance": tolerance * max(scale, 1.0), "ok": difference <= tolerance * max(scale, 1.0)}


def run(root: Path) -> list[dict[str, Any]]:
    import torch
    from tiny_gptq import build_tiny_checkpoint

    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    results = []
    for model_type in ("opt", "bloom"):
        for desc_act in (False, True):
            tag = f"{model_type}-{'act' if desc_act else 'noact'}"
            theirs_dir = gptqmodel_quantize(float_model(root / f"float-{tag}", model_type),
                                            root / f"gptqmodel-{tag}", desc_act=desc_act)
            theirs, dtype = gptqmodel_logits(theirs_dir, ids)
            results.append(compare(f"gptqmodel checkpoint {tag}: ours vs gptqmodel", theirs,
                                   ours_logits(theirs_dir, ids, dtype), dtype))
            ours_dir = build_tiny_checkpoint(root / f"ours-{tag}", model_type, desc_act=desc_act).folder
            save_tokenizer(ours_dir)
            theirs, dtype = gptqmodel_logits(ours_dir, ids)
            results.append(compare(f"gptq-tools checkpoint {tag}: gptqmodel vs ours", theirs,
                                   ours_logits(ours_dir, ids, dtype), dtype))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="keep the checkpoints in this folder (default: a temporary folder)")
    args = parser.parse_args()
    # GPTQModel writes a logs/ folder into the working directory: keep it with the checkpoints.
    if args.out:
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        os.chdir(out)
        results = run(out)
    else:
        with tempfile.TemporaryDirectory() as folder:
            os.chdir(folder)
            results = run(Path(folder))
    for row in results:
        print(json.dumps(row))
    return 0 if all(row["ok"] for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
