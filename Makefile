# Two set-up commands keep working on a fresh machine: `make serve` and `make test`.
# The virtual environment is reused; it is reinstalled only when pyproject.toml changes,
# so llama-cpp-python (built from source, ~8 minutes) is compiled once and cached by pip.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.servelet-installed

.PHONY: install serve test bench bench-engine bench-gateway clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: install
	$(BIN)/servelet serve

test: install
	$(BIN)/pytest

bench: bench-engine bench-gateway

bench-engine: install
	$(BIN)/python bench/engine.py

bench-gateway: install
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) .pytest_cache
