# One entry point for people and CI. Every target does its own set-up on a fresh machine.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-rust test-python lint bench bench-quick setup build-debug build-release clean

$(VENV)/.deps: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q 'maturin>=1.5,<2'
	touch $@

setup: $(VENV)/.deps

# Debug build of the extension for tests (dependencies are still optimised, see Cargo.toml).
build-debug: setup
	$(VENV)/bin/maturin develop -q --extras dev,postgres

# Release build for `make run` and benchmarks.
build-release: setup
	$(VENV)/bin/maturin develop -q --release --extras dev,postgres

run: build-release
	$(VENV)/bin/onetoken serve --demo

test: test-rust test-python

test-rust:
	cargo test -q -p onetoken-gateway -p onetoken-mock-upstream

test-python: build-debug
	$(PY) -m pytest -q tests

lint: setup
	cargo clippy -q -p onetoken-gateway -p onetoken-mock-upstream -p onetoken-py -- -D warnings
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/mypy

bench: build-release
	$(PY) bench/run.py

bench-quick: build-release
	$(PY) bench/run.py --quick

clean:
	rm -rf $(VENV) target python/onetoken/_core*.so
