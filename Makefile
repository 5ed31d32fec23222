# ubertool: `make shell` sets up and opens the sandbox; `make test` sets up and runs the tests.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup warm shell test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Installs, then compiles the sandbox once (about a minute on a new machine, with progress).
setup: $(STAMP)
	$(BIN)/ubertool warm

shell: setup
	$(BIN)/ubertool shell

lint: $(STAMP)
	$(BIN)/ruff check .

test: setup lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python bench/sandbox.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
