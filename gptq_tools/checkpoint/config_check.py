"""Validation of model configs read from files (``config.json``, a preset's ``model_config``).

A config is untrusted input: a lying one (``"num_hidden_layers": 1000000``, zero attention heads,
``"hidden_size": 1e9``) used to make ``plan`` and ``load_quantized`` build a meta model for minutes and
gigabytes before anything noticed. :func:`validate_model_config` checks types and ranges of the fields
that size a model, and :func:`check_config_against_headers` checks what they imply (layer count,
embedding shape) against the safetensors headers, both before anything is built: the work done
before a lie is rejected is bounded by the config's and the headers' own sizes. A config that names
code of its own (``auto_map``, ``trust_remote_code``) or a ``model_type`` transformers has no code for is
refused there too (:func:`check_model_code`): gptq-tools never runs code from a repository.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError, UnsafeCheckpointError, UnsupportedArchitectureError
from .architectures import ArchSpec, supported_model_types

#: Integer fields that size a model: (names the families use, smallest, largest accepted). The limits are
#: far above any real model (BLOOM-176B: hidden 14336, 70 layers, 112 heads, vocab 250880) and far below
#: what would exhaust memory while planning.
SIZE_FIELDS: tuple[tuple[tuple[str, ...], int, int], ...] = (
    (("hidden_size", "n_embd", "n_embed", "d_model"), 1, 1 << 20),
    (("word_embed_proj_dim",), 1, 1 << 20),
    (("num_attention_heads", "n_head"), 1, 1 << 16),
    (("num_key_value_heads",), 1, 1 << 16),
    (("num_hidden_layers", "n_layer", "num_layers"), 1, 1 << 14),
    (("vocab_size",), 1, 1 << 24),
    (("intermediate_size", "ffn_dim", "n_inner"), 1, 1 << 22),
    (("max_position_embeddings", "n_positions"), 1, 1 << 24),
    (("head_dim",), 1, 1 << 16),
)

#: Fields that may be null, meaning "the family's default" (GPT-2's ``n_inner``, Llama's KV heads).
NULLABLE = frozenset({"n_inner", "num_key_value_heads", "head_dim"})


def validate_model_config(config: Mapping[str, Any], *, source: str) -> None:
    """Check the types and ranges of a model config's size fields, and how they fit together.

    Args:
        config: the config as read (``config.json`` parsed, or a preset's ``model_config``).
        source: where it came from, for messages.

    Raises:
        CheckpointError: a field has the wrong type, is out of range, or contradicts another.
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(f"{source}: model_type must be a non-empty string, got {_show(model_type)}")
    check_model_code(config, source=source)
    for names, low, high in SIZE_FIELDS:
        for name in names:
            if name not in config or (config[name] is None and name in NULLABLE):
                continue
            value = config[name]
            if type(value) is not int:
                raise CheckpointError(f"{source}: {name} must be an integer, got {_show(value)}; the config is "
                                      f"corrupt or not a model config")
            if not low <= value <= high:
                raise CheckpointError(f"{source}: {name}={value} is out of range [{low}, {high}]; the config is "
                                      f"corrupt")
    hidden, heads = _first(config, SIZE_FIELDS[0][0]), _first(config, SIZE_FIELDS[2][0])
    if hidden is not None and heads is not None and hidden % heads and config.get("head_dim") is None:
        raise CheckpointError(f"{source}: hidden size {hidden} is not a multiple of the {heads} attention heads")
    kv_heads = config.get("num_key_value_heads")
    if heads is not None and isinstance(kv_heads, int) and heads % kv_heads:
        raise CheckpointError(f"{source}: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")


#: Config keys that make transformers import Python files from the repository (with ``trust_remote_code``).
REMOTE_CODE_KEYS = ("auto_map", "trust_remote_code")


def check_model_code(config: Mapping[str, Any], *, source: str) -> None:
    """Refuse a config whose model would need code that transformers does not ship.

    gptq-tools never passes ``trust_remote_code`` to transformers, so such a config could only fail later,
    deep inside transformers (a ``ValueError`` about an unknown ``model_type``), or, for a built-in
    ``model_type`` that also names remote code, load transformers' own class in place of the one the config
    asks for. Both are refused here in one line naming the config and its ``model_type``.

    Raises:
        UnsafeCheckpointError: the config names remote code (``auto_map``, a true ``trust_remote_code``).
        UnsupportedArchitectureError: transformers has no code for the ``model_type``.
    """
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    builtin = model_type in CONFIG_MAPPING
    named = [key for key in REMOTE_CODE_KEYS if config.get(key)]
    supported = ", ".join(supported_model_types())
    if named:
        keys = " and ".join(named)
        advice = (f"if this is a stock {model_type} model, delete {keys} from the config and run again" if builtin
                  else f"gptq-tools supports the model types {supported}")
        raise UnsafeCheckpointError(f"{source}: model_type {_show(model_type)} names remote code ({keys}); "
                                    f"gptq-tools never runs code from a repository: {advice}")
    if not builtin:
        import transformers

        raise UnsupportedArchitectureError(
            f"{source}: model_type {_show(model_type)} is unknown to transformers {transformers.__version__}; "
            f"gptq-tools supports the model types {supported}")


def check_config_against_headers(config: Mapping[str, Any], arch: ArchSpec, entries: Mapping[str, Any], *,
                                 source: str) -> None:
    """Check the layer count and embedding shape a (validated) config implies against the headers.

    Args:
        config: the config, already through :func:`validate_model_config`.
        arch: its architecture.
        entries: tensor name -> header entry (with ``shape``) of every weight file.
        source: the folder, for messages.

    Raises:
        CheckpointError: the config's sizes are not those of these weights.
    """
    layers = _first(config, SIZE_FIELDS[4][0])
    prefix = arch.layers_path + "."
    indices = {int(rest.partition(".")[0]) for name in entries if name.startswith(prefix)
               and (rest := name[len(prefix):]).partition(".")[0].isdigit()}
    # More layers than the weights hold is the lie that costs (a meta model of a million layers); fewer
    # is reported after building, naming the first tensor the model does not use.
    if layers is not None and indices and max(indices) + 1 < layers:
        raise CheckpointError(f"{source}: config.json says {layers} layers but the weights hold "
                              f"{max(indices) + 1} ({arch.layers_path}.0 to .{max(indices)}); the config belongs "
                              f"to another model")
    embedding = entries.get(f"{arch.input_embedding}.weight") if arch.input_embedding else None
    vocab = config.get("vocab_size")
    width = config.get("word_embed_proj_dim") or _first(config, SIZE_FIELDS[0][0])
    if embedding is not None and vocab is not None and width is not None:
        if tuple(embedding.shape) != (vocab, width):
            raise CheckpointError(f"{source}: config.json implies {arch.input_embedding}.weight of shape "
                                  f"({vocab}, {width}) (vocab_size, hidden size) but the weights hold "
                                  f"{tuple(embedding.shape)}; the config belongs to another model")


def _first(config: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = config.get(name)
        if type(value) is int:
            return value
    return None


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
