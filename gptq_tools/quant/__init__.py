"""GPTQ quantization (imports checkpoint, files and ground): the solver, the streaming driver and the
AutoGPTQ checkpoint writer.

Modules:
    config: :class:`QuantizeConfig`, the frozen settings (bits, group size, act-order, ...).
    gptq: the GPTQ solver, pure tensor math (Hessian accumulator, act-order, damp retry, lazy blocks).
    rtn: round-to-nearest, the baseline and the fallback when a Hessian cannot be inverted.
    calibration: calibration windows from .txt/.jsonl/.safetensors/.pt files.
    source: the model skeleton on meta plus per-module streaming from the source safetensors.
    driver: :func:`quantize_model`, layer by layer, resumable.
    save: shards, index, configs, tokenizer, SHA256SUMS, atomic publication.
    evaluate: perplexity of fp16 or GPTQ folders (dequantized from the checkpoint tensors).
    quality: ``gptq-tools eval``: perplexity on a file and KL divergence from the fp16 model, window by window.

Method: ``fp-target`` by default (each linear solved against the full-precision model's outputs,
:mod:`.fp_target` and :mod:`.reference`); ``QuantizeConfig(method="gptq")`` is plain GPTQ, ``"rtn"``
round-to-nearest. All three write the same checkpoint tensors.

Checkpoint format: AutoGPTQ v1 (``checkpoint_format: "gptq"``) by default. v1 stores ``zero - 1`` and
cannot hold a zero point of 0, so asymmetric v1 quantization keeps every zero >= 1 (decided in the
quantizer, not by clamping afterwards, so the stored values are exactly what GPTQ optimised);
``checkpoint_format="gptq_v2"`` (``--format gptq_v2``) writes unshifted zeros instead. Readers: v1
symmetric is read by everything (AutoGPTQ, GPTQModel, transformers, vLLM); GPTQModel refuses any
asymmetric v1 checkpoint it did not write itself (AutoGPTQ's were corrupt), so for GPTQModel write
asymmetric checkpoints as ``gptq_v2`` (tested in tests/test_quant_interop.py).

Example::

    from gptq_tools import QuantizeConfig, quantize_model
    summary = quantize_model("opt-iml-30b", "opt-iml-30b-gptq", calibration="calib.txt",
                             config=QuantizeConfig(bits=4, group_size=128, desc_act=True), device="cuda")
"""
