# Every target installs what it needs into .venv first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= relay/dev.toml

.PHONY: run test lint format check interop bench deploy-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/relay serve --allow-root --config $(CONFIG)

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check relay tests bench docs
	$(BIN)/ruff format --check relay tests bench docs
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format relay tests bench docs
	$(BIN)/ruff check --fix relay tests bench docs

check: lint test

# Real MTAs (Postfix, Exim, OpenSMTPD, smtp-sink, swaks, dnsmasq) against the relay; installs them.
interop: $(STAMP)
	bash tests/interop/install.sh
	$(BIN)/pytest -q -m interop tests/interop

bench: $(STAMP)
	$(BIN)/python bench/run.py

deploy-check: $(STAMP)
	bash deploy/check.sh

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache
