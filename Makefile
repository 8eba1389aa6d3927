# The README's commands. Everything installs from the project's own files:
# Python packages into .venv, Kafka jars through Maven into ~/.cache/aipipe,
# Debian's redis-server when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Every version and hash of every dependency, for all the extras (README, "Install"). uv
# takes it as constraints: an install of any extras is pinned and hash-checked by it (pip
# cannot: hashes in its constraints demand one for the project's own directory too).
LOCK   := infra/requirements.lock

.PHONY: install lock tools up down status demo test test-unit bench lint clean

# Everything the program runs (workers, embedded chDB, report) and the dev tools, by uv,
# itself installed from its pin in the lock (the block that `sed` cuts out of it).
install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	sed -n '/^uv==/,/# via/p' $(LOCK) | $(BIN)/python -m pip install -q --require-hashes -r /dev/stdin
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c $(LOCK) -e '.[all,dev]'
	$(BIN)/python -m compileall -q -j 0 streams producers consumers schemas infra
	touch $(STAMP)

# Re-resolve the lock after a change to pyproject.toml's dependencies, keeping the other
# pins; `make lock LOCK_ARGS=--upgrade` moves everything to the newest allowed versions,
# `LOCK_ARGS='--upgrade-package openai'` one package.
LOCK_ARGS ?=
lock: install
	UV_CUSTOM_COMPILE_COMMAND='make lock' $(BIN)/uv pip compile pyproject.toml --all-extras \
	    --universal --python-version 3.11 --generate-hashes --quiet $(LOCK_ARGS) -o $(LOCK)

up: install
	$(BIN)/aipipe up

down:
	-$(BIN)/aipipe down

status: install
	$(BIN)/aipipe status

demo: up
	$(BIN)/aipipe demo

# Clients the tests use that are not aipipe's own (Debian packages; CI runs as root: kcat, the
# headless chromium that Playwright drives, never a browser download, the Prometheus server
# that scrapes the workers in tests/e2e/test_metrics.py), and
# the toolchains of the example producers in producers/examples (Java 17 + Maven from
# Debian; Go 1.26 is not in Debian 12, so it must already be on the machine: the check
# names what is wrong, and the Go modules are fetched now, not in the middle of a test).
GO ?= $(shell command -v go || echo /usr/local/go/bin/go)
tools:
	@command -v kcat >/dev/null || { apt-get update -qq && apt-get install -y -qq kcat; }
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }
	@command -v prometheus >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus; }
	@{ command -v java && command -v mvn; } >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq openjdk-17-jdk-headless maven; }
	@test -x "$(GO)" || { echo "Go 1.26 is missing (looked on PATH and in /usr/local/go/bin): \
	the Go producer in producers/examples/go needs it" >&2; exit 1; }
	cd producers/examples/go && GOTOOLCHAIN=local GOFLAGS=-mod=mod $(GO) mod download

# The suite in two processes (pytest-xdist; a file's tests stay in one, so a module's
# fixtures start once): one test's waits on worker start-ups, Kafka and deadlines overlap
# another's work. Then the tests marked `alone`, by themselves: they bound time or
# throughput, which another test's load on the cores would change. Each part lists its
# slowest tests.
test: up tools
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not alone" --durations=20
	$(BIN)/python -m pytest -m alone --durations=5

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
