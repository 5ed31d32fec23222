# ubertool: `make serve` sets up and serves MCP; `make test` sets up and runs the tests.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup serve shell test lint bench bench-peers soak clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Installs, then compiles the sandbox once (about a minute on a new machine, with progress).
setup: $(STAMP)
	$(BIN)/ubertool warm
	@echo "ubertool is installed in $(VENV)/bin: run '. $(VENV)/bin/activate' to put it on PATH, or call $(BIN)/ubertool."

# The main job: the MCP server on the embedded default policy, streamable HTTP on loopback.
serve: setup
	$(BIN)/ubertool serve --transport http --host 127.0.0.1 --port 8765

shell: setup
	$(BIN)/ubertool shell

lint: $(STAMP)
	$(BIN)/ruff check .

test: setup lint
	bash .ci/system-deps
	$(BIN)/pytest

bench: setup
	rm -f bench/results/summary.jsonl
	$(BIN)/python bench/sandbox.py
	$(BIN)/python bench/mcp_server.py
	$(BIN)/python bench/mounts.py
	$(BIN)/python bench/playbooks.py
	$(BIN)/python bench/bounds.py
	$(BIN)/python bench/summary.py

# ubertool beside its peers in one run; writes bench/results/peers.md.
bench-peers: setup
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/peers.py

# 32 concurrent MCP sessions of mixed cells for 5 minutes (CI runs a short one in the tests).
soak: setup
	$(BIN)/python bench/soak.py --sessions 32 --seconds 300

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
