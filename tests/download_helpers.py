"""Repositories served to the download tests (small, deterministic bytes)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from tests.hub_server import HubServer

FAST = {"backoff_base": 0.02, "backoff_max": 0.1, "stall_timeout": 5.0, "connect_timeout": 5.0}


def blob(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes (deterministic per seed)."""
    return random.Random(seed).randbytes(size)


def safetensors_blob(size: int, seed: int) -> bytes:
    """A valid safetensors file of about ``size`` bytes: one uint8 tensor of random bytes."""
    from gptq_tools.files.safetensors_format import build_header

    header, _ = build_header([("weight", "U8", (size,))])
    return header + blob(size, seed)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class SeedData:
    """The bytes behind the served repositories, to compare downloads with."""

    model_main: dict[str, bytes]
    model_dev: dict[str, bytes]
    split_parts: dict[str, bytes]
    split_whole: bytes
    bloom_parts: dict[str, bytes]
    bloom_128g: bytes


def populate(server: HubServer) -> SeedData:
    """Serve ``org/model`` (main, dev), ``org/split`` (main: three parts + SHA256SUMS, whole), ``org/gated``,
    and a miniature ``TheBloke/bloomz-176B-GPTQ`` (main: three parts, group_size_128g: one file)."""
    model_main = {
        "config.json": json.dumps({"model_type": "opt", "hidden_size": 8}).encode(),
        "model.safetensors": blob(700_000, 1),
        "tokenizer/vocab.json": b'{"a": 0}',
        "README.md": b"# model\n",
    }
    model_dev = {"config.json": b'{"model_type": "opt", "hidden_size": 16}', "model.safetensors": blob(300_000, 2)}
    whole = safetensors_blob(899_920, 3)
    assert len(whole) == 900_000
    stem = "gptq_model-4bit--1g"
    parts = {f"{stem}.JOINBEFOREUSE.split-{letter}.safetensors": whole[i * 400_000:(i + 1) * 400_000]
             for i, letter in enumerate("abc")}
    sums = f"{sha256(whole)}  {stem}.safetensors\n".encode()
    server.add_repo("org/model", {"main": model_main, "dev": model_dev})
    server.add_repo("org/split", {"main": {**parts, "SHA256SUMS": sums, "config.json": b"{}"},
                                  "whole": {f"{stem}.safetensors": whole}})
    server.add_repo("org/gated", {"main": {"config.json": b"{}", "model.safetensors": blob(1000, 4)}}, gated=True)
    bloom_128g = blob(200_000, 5)
    server.add_repo("TheBloke/bloomz-176B-GPTQ", {
        "main": {**parts, "quantize_config.json": b'{"bits": 4, "group_size": -1}'},
        "group_size_128g": {"gptq_model-4bit-128g.safetensors": bloom_128g,
                            "quantize_config.json": b'{"bits": 4, "group_size": 128}'}})
    return SeedData(model_main, model_dev, parts, whole, parts, bloom_128g)


def populate_docs(server: HubServer) -> SeedData:
    """:func:`populate`, plus ``org/nosums`` (TheBloke's layout: parts and small files, no ``SHA256SUMS``): the
    repositories the documentation's examples download (``python -m tests.hub_server`` serves them)."""
    seed = populate(server)
    server.add_repo("org/nosums", {"main": {**seed.split_parts, "config.json": b'{"model_type": "opt"}'}})
    return seed
