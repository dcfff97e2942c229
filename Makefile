# Quick start: `make run GOAL="..."` runs a goal on the embedded mesh, `make test` runs the suite.
# Both create the virtual environment (.venv) on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GOAL ?= Build me a login system

# The edge extra compiles llama.cpp (~8 min on 2 cores; pip caches the wheel). Portable x86-64 flags
# (AVX2/FMA/F16C, no -march=native) and no llama.cpp tools, tests or server binary: the mesh uses
# llama-cpp-python's own server.
EDGE_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: run up test bench schemas screenshots clean edge

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

edge: $(STAMP)
	CMAKE_ARGS="$(EDGE_CMAKE_ARGS)" $(BIN)/python -m pip install -e '.[test,bench,edge]'

bench: $(STAMP)
	$(BIN)/mesh bench

schemas: $(STAMP)
	$(BIN)/mesh schemas export

# docs/img/: the dashboard screenshots, made by the browser test itself (Chromium: apt-get install chromium)
screenshots: $(STAMP)
	MESH_SCREENSHOTS=$(CURDIR)/docs/img $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_dashboard_browser.py

clean:
	rm -rf $(VENV) .mesh
