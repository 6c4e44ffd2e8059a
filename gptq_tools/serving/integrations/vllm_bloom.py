"""BLOOM for vLLM that loads GPTQ checkpoints (ours, AutoGPTQ's, TheBloke's), as an out-of-tree model.

vLLM 0.32's ``BloomForCausalLM`` fails on GPTQ checkpoints for two reasons, both in its weight loading:

1. ``load_weights`` puts ``transformer.`` in front of every name that lacks it, ``lm_head.weight``
   included, so a checkpoint that stores the tied head (AutoGPTQ's loader needs it; ours and
   TheBloke's store it) fails with "There is no module or parameter named 'lm_head' in BloomModel".
   (vLLM 0.32 unties the head of any checkpoint that stores one, to load it and re-tie it if equal,
   so the stored head must reach ``self.lm_head``.)
2. ``BloomModel._repack_qkv`` reorders the fused ``query_key_value`` outputs from BLOOM's
   (heads, 3, head_size) to vLLM's (3, heads, head_size) by viewing dimension 0 as the output
   dimension. That is right for a float ``weight`` (out, in) and ``bias``, wrong for GPTQ tensors:
   ``qweight`` (in/pack, out) and ``scales`` (groups, out) have the outputs on dimension 1, and
   ``qzeros`` (groups, out/pack) packs several outputs per int32, so the view fails with a reshape
   error (or, when the sizes happen to divide, scrambles the inputs). ``g_idx`` has no output dimension.

This class reorders each tensor along its real output dimension (unpacking and repacking ``qzeros``,
see :mod:`gptq_tools.serving.integrations.bloom_qkv`) and gives a stored ``lm_head.weight`` to the head
(when the config ties it, vLLM's own re-tying then applies); everything else is vLLM's own BLOOM. It
is registered by :func:`gptq_tools.serving.integrations.vllm.register`. Tensor parallelism is untouched: the
reorder happens before vLLM's loaders shard the fused tensor, as in vLLM's own code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.bloom import BloomForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader

from .bloom_qkv import repack_qkv_tensor


class GptqBloomForCausalLM(BloomForCausalLM):
    """vLLM's BLOOM with a QKV reorder that knows GPTQ tensors, and a stored ``lm_head`` loaded as the head."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # BloomModel.load_weights runs every tensor through self._repack_qkv: give it ours (this keeps
        # the rest of vLLM's loading: quantization mappers, ignored suffixes, sharding).
        self.transformer._repack_qkv = self._repack_qkv

    def _repack_qkv(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        heads = self.config.num_attention_heads
        out_features = 3 * self.config.hidden_size
        for name, tensor in weights:
            if ".query_key_value." in name:
                tensor = repack_qkv_tensor(name, tensor, heads=heads, out_features=out_features)
            yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load ``(name, tensor)`` pairs; returns the names of the parameters loaded (vLLM's contract)."""
        head: list[tuple[str, torch.Tensor]] = []

        def body() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if not name.startswith("lm_head."):
                    yield name, tensor
                elif not self.config.tie_word_embeddings:
                    # vLLM unties the head when the checkpoint stores one (and re-ties it after loading
                    # if the two are equal); BloomForCausalLM would file it under transformer.
                    head.append((name, tensor))
                # a tied head is the word embedding, loaded under its own name

        loaded = super().load_weights(body())
        if head:
            loaded |= AutoWeightsLoader(self).load_weights(head)
        return loaded
