"""The model card ``gptq-tools publish`` writes as ``README.md``: YAML front matter the Hub reads, the
quantization settings, the files with their SHA256, how to download, join and verify, and the quality
numbers of ``eval.json``.

Everything taken from the folder (``config.json``, ``quantize_config.json``, ``eval.json``) is untrusted
text: only known fields of the expected types are used, and each value is reduced to one line of plain
characters before it lands in YAML or Markdown, so a config cannot inject front matter, HTML or table rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint.presets import REPO_ID_RE
from ..units import format_size

#: First line of every card publish writes: a later publish knows the README on the Hub is its own.
CARD_MARKER = "<!-- model card written by gptq-tools publish; edit freely, a republish replaces it -->"
#: quantize_config.json fields shown, in this order.
SETTINGS = ("bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential", "static_groups",
            "checkpoint_format", "quant_method", "model_file_base_name")
_PLAIN = re.compile(r"[^A-Za-z0-9 _.,:;/+=()\[\]@#%~^-]")


@dataclass(frozen=True)
class CardFile:
    """One uploaded file as the card lists it."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CardJoin:
    """A file uploaded as byte parts: its name, its parts in order and its SHA256."""

    output: str
    parts: tuple[str, ...]
    sha256: str


@dataclass(frozen=True)
class CardReshard:
    """A file uploaded as shards with an index instead of as itself."""

    source: str
    sha256: str
    shards: tuple[str, ...]
    index: str


@dataclass(frozen=True)
class CardInputs:
    """What the card says, gathered by :mod:`gptq_tools.hub.publish`."""

    repo_id: str
    revision: str
    title: str
    config: dict[str, Any]
    quantize_config: dict[str, Any] | None
    quantize_source: str | None
    files: tuple[CardFile, ...]
    joins: tuple[CardJoin, ...]
    reshards: tuple[CardReshard, ...]
    evals: tuple[dict[str, Any], ...]


def plain(value: object, limit: int = 120) -> str:
    """``value`` as one short line of harmless characters (for YAML, Markdown tables and headings)."""
    text = value if isinstance(value, str) else json.dumps(value)
    text = _PLAIN.sub("?", text.replace("\n", " "))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render_card(inputs: CardInputs) -> str:
    """The whole ``README.md``."""
    sections = [_front_matter(inputs), CARD_MARKER, f"# {plain(inputs.title)}", _intro(inputs),
                _settings(inputs), _download(inputs)]
    if inputs.joins:
        sections.append(_join(inputs))
    sections += [_verify(inputs), _files(inputs)]
    if inputs.evals:
        sections.append(_quality(inputs))
    return "\n\n".join(s for s in sections if s) + "\n"


def _base_model(config: dict[str, Any]) -> str | None:
    name = config.get("_name_or_path")
    if isinstance(name, str) and "/" in name and REPO_ID_RE.match(name) and ".." not in name:
        return name
    return None


def _front_matter(inputs: CardInputs) -> str:
    lines = ["---", "library_name: transformers"]
    base = _base_model(inputs.config)
    if base:
        lines.append(f"base_model: {base}")
    tags = ["gptq", "gptq-tools"]
    if inputs.quantize_config is not None and type(inputs.quantize_config.get("bits")) is int:
        tags.insert(1, f"{inputs.quantize_config['bits']}-bit")
    model_type = inputs.config.get("model_type")
    if isinstance(model_type, str) and re.fullmatch(r"[a-z0-9_-]{1,40}", model_type):
        tags.append(model_type)
    lines.append("tags:")
    lines += [f"- {tag}" for tag in tags]
    architectures = inputs.config.get("architectures")
    if isinstance(architectures, list) and any(isinstance(a, str) and a.endswith("ForCausalLM")
                                               for a in architectures):
        lines.append("pipeline_tag: text-generation")
    lines.append("---")
    return "\n".join(lines)


def _intro(inputs: CardInputs) -> str:
    base = _base_model(inputs.config)
    what = "A GPTQ checkpoint" if inputs.quantize_config is not None else "A safetensors model"
    source = f" of [{base}](https://huggingface.co/{base})" if base else ""
    return (f"{what}{source}, published with `gptq-tools publish` to `{inputs.repo_id}`, branch "
            f"`{plain(inputs.revision)}`. Every file is listed in `SHA256SUMS`.")


def _settings(inputs: CardInputs) -> str:
    if inputs.quantize_config is None:
        return ("## Quantization settings\n\nNone: the folder had no `quantize_config.json` and no "
                "`quantization_config` in `config.json`, so this is not a GPTQ checkpoint.")
    rows = [f"| `{name}` | {plain(inputs.quantize_config[name])} |" for name in SETTINGS
            if name in inputs.quantize_config and isinstance(inputs.quantize_config[name], (bool, int, float, str))]
    note = ""
    group = inputs.quantize_config.get("group_size")
    if group == -1:
        note = "\n\n`group_size` -1: one scale per output channel (no grouping)."
    return (f"## Quantization settings\n\nFrom `{plain(inputs.quantize_source or 'quantize_config.json')}`:\n\n"
            "| setting | value |\n| --- | --- |\n" + "\n".join(rows) + note)


def _download(inputs: CardInputs) -> str:
    joined = (" Split parts are joined on arrival and the joined file is checked against `SHA256SUMS`."
              if inputs.joins else "")
    return ("## Download\n\n```\n"
            f"gptq-tools download {inputs.repo_id} --revision {inputs.revision}\n```\n\n"
            f"Every file is checked against the Hub's SHA256 while it streams; an interrupted download resumes."
            f"{joined}")


def _join(inputs: CardInputs) -> str:
    blocks = ["## Joining the parts by hand",
              "Some files are larger than the Hub's per-file limit, so they are uploaded as byte parts. "
              "`gptq-tools download` joins them for you; without it:"]
    for join in inputs.joins:
        parts = list(join.parts)
        blocks.append(f"`{join.output}` ({len(parts)} parts):\n\n```\n"
                      f"cat {' '.join(parts)} > {join.output}\n```\n\nOn Windows:\n\n```\n"
                      f"COPY /B {' + '.join(parts)} {join.output}\n```\n\n"
                      f"The joined file's SHA256 (also in `SHA256SUMS`):\n\n```\n{join.sha256}  {join.output}\n```")
    blocks.append("Or join and verify in one pass: `gptq-tools join "
                  f"{inputs.joins[0].parts[0]}` (it reads `SHA256SUMS`). Once the joined file is verified, the "
                  "parts can be deleted.")
    return "\n\n".join(blocks)


def _verify(inputs: CardInputs) -> str:
    lines = ["## Verify",
             "Before downloading, check that the repository's `SHA256SUMS` matches the Hub's own hashes:",
             f"```\ngptq-tools verify --remote {inputs.repo_id}:{inputs.revision}\n```",
             "After downloading, in the download folder (`sha256sum` skips the lines of files you do not have, "
             "e.g. the parts once joined):",
             "```\ngptq-tools verify -c SHA256SUMS\nsha256sum -c --ignore-missing SHA256SUMS\n```"]
    for reshard in inputs.reshards:
        lines.append(f"`{reshard.source}` (SHA256 `{reshard.sha256}`) was resharded into {len(reshard.shards)} "
                     f"valid safetensors files with `{reshard.index}`, which transformers, vLLM and GPTQModel "
                     f"load directly.")
    return "\n\n".join(lines)


def _files(inputs: CardInputs) -> str:
    rows = [f"| `{f.name}` | {format_size(f.size)} | `{f.sha256}` |" for f in inputs.files]
    return "## Files\n\n| file | size | sha256 |\n| --- | --- | --- |\n" + "\n".join(rows)


def _quality(inputs: CardInputs) -> str:
    rows = []
    for result in inputs.evals:
        reference = result.get("reference_perplexity")
        kl = result.get("kl_divergence")
        rows.append(f"| {plain(Path(result['data']).name, 60)} | {result['tokens']} | {result['seqlen']} | "
                    f"{result['perplexity']:.4f} | {'' if reference is None else f'{reference:.4f}'} | "
                    f"{'' if kl is None else f'{kl:.6f}'} |")
    return ("## Quality\n\nMeasured with `gptq-tools eval --save` (perplexity over non-overlapping windows; KL "
            "divergence of the next-token distributions from the fp16 model, in nats per token):\n\n"
            "| text | tokens | window | perplexity | fp16 perplexity | KL divergence |\n"
            "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows))

