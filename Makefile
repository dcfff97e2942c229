# Quick start: `make run GOAL="..."` runs a goal on the embedded mesh, `make test` runs the suite.
# Both create the virtual environment (.venv) on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GOAL ?= Build me a login system

.PHONY: run up test bench schemas clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/mesh run "$(GOAL)"

up: $(STAMP)
	$(BIN)/mesh up

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/mesh bench

schemas: $(STAMP)
	$(BIN)/mesh schemas export

clean:
	rm -rf $(VENV) .mesh
