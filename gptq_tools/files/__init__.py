"""Byte-level, model-agnostic files (imports only the ground modules): split parts, join, split, reshard,
SHA256 manifests and ``verify``, JUnit reports, name quoting and validation, the safetensors header format,
strict JSON, and the atomic, space-checked, streamed file I/O under all of them."""
