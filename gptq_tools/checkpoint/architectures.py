"""The one architecture table: what differs between model families, as data.

For each family: where the decoder layers are, which linears inside a layer are quantized and in which
order (true-sequential groups: linears in one group see the same input and are quantized together),
which modules sit outside the layers (before them: embeddings; after them: final norm), and the
output head. The quantizer, the checkpoint validator, the planner and the loader all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """How one model family is laid out (names are module paths as in transformers)."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str  # the ModuleList of decoder layers
    sequential: tuple[tuple[str, ...], ...]  # quantized linears inside a layer, in true-sequential groups
    before_layers: tuple[str, ...]  # modules run before the first layer (embeddings)
    after_layers: tuple[str, ...]  # modules run after the last layer (final norm)
    lm_head: str = "lm_head"
    input_embedding: str = ""  # the embedding weight a tied lm_head shares
    conv1d: bool = False  # linears are transformers' Conv1D (weight stored as (in, out))

    @property
    def quantized_linears(self) -> tuple[str, ...]:
        """All quantized linear names inside one layer, in quantization order."""
        return tuple(name for group in self.sequential for name in group)


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        name="opt", model_types=("opt",), layers_path="model.decoder.layers",
        sequential=(("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.out_proj",),
                    ("fc1",), ("fc2",)),
        before_layers=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
        after_layers=("model.decoder.final_layer_norm", "model.decoder.project_out"),
        input_embedding="model.decoder.embed_tokens",
    ),
    ArchSpec(
        name="bloom", model_types=("bloom",), layers_path="transformer.h",
        sequential=(("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",),
                    ("mlp.dense_4h_to_h",)),
        before_layers=("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
        after_layers=("transformer.ln_f",),
        input_embedding="transformer.word_embeddings",
    ),
    ArchSpec(
        name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), layers_path="model.layers",
        sequential=(("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"), ("self_attn.o_proj",),
                    ("mlp.up_proj", "mlp.gate_proj"), ("mlp.down_proj",)),
        before_layers=("model.embed_tokens", "model.rotary_emb"),
        after_layers=("model.norm",),
        input_embedding="model.embed_tokens",
    ),
    ArchSpec(
        name="gpt_neox", model_types=("gpt_neox",), layers_path="gpt_neox.layers",
        sequential=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                    ("mlp.dense_4h_to_h",)),
        before_layers=("gpt_neox.embed_in", "gpt_neox.rotary_emb"),
        after_layers=("gpt_neox.final_layer_norm",),
        lm_head="embed_out", input_embedding="gpt_neox.embed_in",
    ),
    ArchSpec(
        name="gpt2", model_types=("gpt2",), layers_path="transformer.h",
        sequential=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
        before_layers=("transformer.wte", "transformer.wpe"),
        after_layers=("transformer.ln_f",),
        input_embedding="transformer.wte", conv1d=True,
    ),
)


def supported_model_types() -> list[str]:
    """Every ``model_type`` the table knows, sorted."""
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def get_arch(model_type: str | None, *, source: str = "model") -> ArchSpec:
    """The :class:`ArchSpec` for a config's ``model_type``.

    Raises:
        UnsupportedArchitectureError: the type is not in the table (the message lists those that are).
    """
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitectureError(
        f"{source}: architecture {model_type!r} is not supported; supported model types: "
        f"{', '.join(supported_model_types())}")
