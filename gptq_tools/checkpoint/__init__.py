"""GPTQ checkpoints as data (imports files and ground): validation, the model folder's files and config, the
packed tensor format, the one architecture table, presets, ``inspect``, and the built-in tiny models."""
