# SmallMind: `make run` starts the app, `make test` runs the full test suite.
# Both create ./.venv on first use and re-install it when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench venv model test-models clean-venv desktop-entry

run: model
	$(BIN)/smallmind

test: model test-models
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: model
	@set -e; scripts="$(sort $(filter-out benchmarks/__init__.py benchmarks/common.py benchmarks/anchor%,$(wildcard benchmarks/*.py)))"; \
	if [ -z "$$scripts" ]; then echo "no benchmarks yet"; fi; \
	for script in $$scripts; do echo "== $$script"; $(BIN)/python $$script; done

# The default model (a no-op when it is already installed and verified).
model: $(STAMP)
	$(BIN)/smallmind models pull

# Models the reference tests also need: Gemma 3 270M, under the Gemma Terms of Use, which running the
# test suite accepts (https://ai.google.dev/gemma/terms).
test-models: $(STAMP)
	$(BIN)/smallmind models pull gemma3-270m --accept-license

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[gui,test,dev]'
	touch $@

clean-venv:
	rm -rf $(VENV)

# SmallMind in the desktop's application menu (~/.local/share/applications/smallmind.desktop + icon).
desktop-entry: $(STAMP)
	$(BIN)/smallmind install-desktop-entry
