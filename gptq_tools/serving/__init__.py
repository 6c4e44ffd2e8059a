"""Other engines (imports runtime and everything below): ``plan --engine vllm`` and the vLLM plugin for GPTQ BLOOM."""
