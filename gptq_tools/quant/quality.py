"""``gptq-tools eval``: perplexity of a model folder (fp16 or GPTQ, dequantized from its own tensors) on a
text or calibration file, and the KL divergence from an fp16 reference's next-token distribution.

Perplexity alone hides 4-bit noise on small models (it moves by hundredths of a percent); the KL divergence
per token from the fp16 model is the sensitive measure. Windows are non-overlapping, ``seqlen`` tokens each,
the same for both models, and only one window's logits are held at a time (a 250k vocabulary x 2048 tokens
is 2 GB in fp32).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..progress import tqdm
from .calibration import read_token_ids
from .evaluate import load_for_eval

logger = logging.getLogger(__name__)

#: The longest window used when the model states no maximum (ALiBi models like BLOOM).
DEFAULT_SEQLEN = 2048


@dataclass(frozen=True)
class EvalReport:
    """One model's quality on one file (and against a reference when one was given)."""

    model: str
    data: str
    tokens: int
    windows: int
    seqlen: int
    perplexity: float
    seconds: float
    reference: str | None = None
    reference_perplexity: float | None = None
    kl_divergence: float | None = None  # mean KL(reference || model) per predicted token, in nats

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_model(model_dir: str | Path, data: str | Path, *, against: str | Path | None = None,
                   seqlen: int | None = None, max_tokens: int | None = None,
                   progress: bool | None = None) -> EvalReport:
    """Perplexity of ``model_dir`` on the tokens of ``data``, and KL from ``against`` when given.

    Args:
        model_dir: a model folder (fp16 or GPTQ; GPTQ weights are dequantized as stored).
        data: a text (``.txt``, ``.jsonl``) or token file (``.safetensors``, ``.pt``): held-out text for
            quality, or the calibration file to see the fit to it.
        against: the fp16 model folder the checkpoint was quantized from (same tokenizer).
        seqlen: tokens per window (default: the model's maximum, at most 2048).
        max_tokens: use only the first ``max_tokens`` tokens of ``data``.
        progress: show a progress bar over windows (None: when stderr is a terminal).

    Raises:
        UsageError: fewer tokens than one window, or a bad ``seqlen``/``max_tokens``.
        CalibrationError: ``data`` is missing, empty or of an unknown format.
        CheckpointError: a folder's tensors do not match its config.
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    tokenizer = _tokenizer(model_dir, against)
    ids = read_token_ids(data, tokenizer)
    if max_tokens is not None:
        if max_tokens < 1:
            raise UsageError(f"--max-tokens must be positive, got {max_tokens}")
        ids = ids[:max_tokens]
    model = load_for_eval(model_dir)
    seqlen = seqlen or _default_seqlen(model)
    windows = ids.numel() // seqlen
    if seqlen < 2 or windows == 0:
        raise UsageError(f"{data}: {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; give more "
                         f"text or a smaller --seqlen")
    reference = load_for_eval(against) if against is not None else None
    nll, ref_nll, kl = 0.0, 0.0, 0.0
    with torch.no_grad():
        for index in tqdm(range(windows), desc=f"eval {model_dir.name}", unit="window", disable=_off(progress)):
            window = ids[index * seqlen:(index + 1) * seqlen]
            own = _log_probs(model, window)  # (seqlen - 1, vocab)
            targets = window[1:].unsqueeze(1)
            nll -= float(own.gather(1, targets).sum())
            if reference is not None:
                ref = _log_probs(reference, window)
                ref_nll -= float(ref.gather(1, targets).sum())
                kl += float((ref.exp() * (ref - own)).sum())
    count = windows * (seqlen - 1)
    return EvalReport(model=str(model_dir), data=str(data), tokens=windows * seqlen, windows=windows, seqlen=seqlen,
                      perplexity=math.exp(nll / count), seconds=time.perf_counter() - started,
                      reference=None if against is None else str(against),
                      reference_perplexity=None if reference is None else math.exp(ref_nll / count),
                      kl_divergence=None if reference is None else kl / count)


def _log_probs(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=window.unsqueeze(0), use_cache=False).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _tokenizer(model_dir: Path, against: str | Path | None) -> Any:
    """The model folder's tokenizer, else the reference's (a checkpoint copied without its tokenizer)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if against is None:
            raise UsageError(f"{model_dir}: no tokenizer ({exc}); copy the tokenizer files into the folder, or "
                             f"give --against the fp16 folder that has them") from None
        logger.info("%s: no tokenizer here, using the one in %s", model_dir, against)
        return AutoTokenizer.from_pretrained(against, trust_remote_code=False)


def _default_seqlen(model: torch.nn.Module) -> int:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(DEFAULT_SEQLEN, int(limit)) if limit else DEFAULT_SEQLEN


def _off(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def format_report(report: EvalReport) -> str:
    """Two or three lines for the terminal."""
    lines = [f"{report.model}: perplexity {report.perplexity:.4f} on {report.data} ({report.tokens} tokens, "
             f"{report.windows} windows of {report.seqlen}, {report.seconds:.1f} s)"]
    if report.reference is not None:
        lines.append(f"{report.reference} (reference): perplexity {report.reference_perplexity:.4f}")
        lines.append(f"KL divergence from the reference: {report.kl_divergence:.6f} nats/token (0 = identical "
                     f"next-token distributions)")
    return "\n".join(lines)
