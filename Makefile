# The two commands of the README: `make demo` and `make test` (each sets up first; CI runs
# `make test`, everything). `make check`: lint and the tests that start no process and load no
# real model, in under 2 minutes, for contributors.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test check lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh constraints/cpu.txt
	VENV=$(VENV) scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/genq run examples/prompts.jsonl -o out/results.jsonl

# two test processes (one per core), each running one test file at a time; tests/conftest.py
# gives each process, and the workers it starts, one core's worth of torch and vLLM threads,
# and forks those workers from a process with the libraries imported
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile

check: setup
	$(BIN)/ruff check worker tests bench
	$(BIN)/python -m pytest -q -m "not process and not model"

lint: setup
	$(BIN)/ruff check worker tests bench
