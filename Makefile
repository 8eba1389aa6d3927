# The README's commands. Everything installs from the project's own files:
# Python packages into .venv, Kafka jars through Maven into ~/.cache/aipipe,
# Debian's redis-server when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install tools up down status demo test test-unit bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

up: install
	$(BIN)/aipipe up

down:
	-$(BIN)/aipipe down

status: install
	$(BIN)/aipipe status

demo: up
	$(BIN)/aipipe demo

# Clients the tests use that are not aipipe's own (Debian packages; CI runs as root).
tools:
	@command -v kcat >/dev/null || { apt-get update -qq && apt-get install -y -qq kcat; }

test: up tools
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest tests/unit

bench: up
	$(BIN)/python -m tests.bench

# mypy does not follow the editable install's import hook, so it checks the `aipipe`
# namespace through a tree of links that lays the folders out as installed.
TYPECHECK := .aipipe/typecheck
lint: install
	$(BIN)/ruff check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/aipipe
	ln -s $(CURDIR)/infra/app/*.py $(TYPECHECK)/aipipe/
	for d in schemas producers streams consumers infra; do ln -s $(CURDIR)/$$d $(TYPECHECK)/aipipe/$$d; done
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy

clean: down
	rm -rf .aipipe
