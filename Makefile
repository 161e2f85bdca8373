# Two entry points for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: install install-test serve chat test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so nothing that depends on it can pull a CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/tidellm serve $(MODEL)

chat: install
	$(BIN)/tidellm chat $(if $(MODEL),--model $(MODEL))

test: install-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check tidellm tests && $(BIN)/ruff format --check tidellm tests

bench: install
	$(BIN)/tidellm bench throughput $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
