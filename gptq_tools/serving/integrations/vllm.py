"""vLLM plugin entry point (``vllm.general_plugins``): registers our BLOOM loader for GPTQ checkpoints.

vLLM calls :func:`register` in every process it starts, once gptq-tools is installed in vLLM's
environment (``pip install gptq-tools``, or ``make venv-vllm`` here). The model class is registered
by its import path, so vLLM imports it only when a BLOOM model is actually loaded; ``VLLM_PLUGINS``
(a comma-separated list of plugin names) can leave this one out.
"""

from __future__ import annotations

#: The name vLLM lists this plugin under (what ``VLLM_PLUGINS`` selects).
PLUGIN_NAME = "gptq_tools_bloom"


def register() -> None:
    """Make vLLM's ``BloomForCausalLM`` architecture load through :mod:`gptq_tools.serving.integrations.vllm_bloom`."""
    from vllm import ModelRegistry

    ModelRegistry.register_model("BloomForCausalLM", "gptq_tools.serving.integrations.vllm_bloom:GptqBloomForCausalLM")
