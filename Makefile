# The two commands of the README: `make demo` and `make test` (each sets up first).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh constraints/cpu.txt
	VENV=$(VENV) scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/genq run examples/prompts.jsonl -o out/results.jsonl

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check worker tests
