# One entry point for people and CI. Every target does its own set-up on a fresh machine.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-rust test-python test-deploy deploy-tools deploy-render docs lint bench bench-quick bench-scale bench-analytics locust setup build-debug build-release clean fuzz

$(VENV)/.deps: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q 'maturin>=1.5,<2'
	touch $@

setup: $(VENV)/.deps

# What ruff and mypy need, without building the extension (mypy reads _core.pyi): the
# package's dependencies and its dev extra, as pyproject.toml lists them.
$(VENV)/.lint-deps: pyproject.toml $(VENV)/.deps
	$(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	  print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"] \
	  + p["optional-dependencies"]["postgres"]))' >$(VENV)/lint-requirements.txt
	$(PIP) install -q -r $(VENV)/lint-requirements.txt
	touch $@

# Debug build of the extension for tests (dependencies are still optimised, see Cargo.toml).
build-debug: setup
	$(VENV)/bin/maturin develop -q --extras dev,postgres

# Release build for `make run` and benchmarks.
build-release: setup
	$(VENV)/bin/maturin develop -q --release --extras dev,postgres

run: build-release
	$(VENV)/bin/onetoken serve --demo

test: test-rust test-python

# The offline checks of deploy/ (kubernetes-validate, checkov, the compose-spec schema, and
# where kubectl is installed a fresh render compared with deploy/k8s/rendered/) run inside
# tests/unit/test_deploy_files.py, as part of test-python.
# Their tools pin dependencies of their own, so they get a venv of their own, rebuilt only
# when deploy/requirements.txt changes: its stamp is named by the file's content, not its
# date, so a fresh clone reuses a venv kept outside it (.ci/run puts it in ~/.cache).
DEPLOY_VENV ?= $(VENV)-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.deps-$(shell sha256sum deploy/requirements.txt | cut -c1-16)
$(DEPLOY_STAMP):
	rm -rf $(DEPLOY_VENV)
	python3 -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q -r deploy/requirements.txt
	touch $@

deploy-tools: $(DEPLOY_STAMP)

# The rendered manifests of each Kubernetes overlay, committed in deploy/k8s/rendered/: the
# checks run on them, so they need no kubectl (a fresh CI machine may have none). Run after
# changing deploy/k8s; with kubectl installed, make test fails until they are regenerated.
K8S_OVERLAYS := dev prod
deploy-render:
	set -e; for o in $(K8S_OVERLAYS); do \
	  deploy/k8s/render.sh $$o >deploy/k8s/rendered/$$o.yaml.tmp; \
	  mv deploy/k8s/rendered/$$o.yaml.tmp deploy/k8s/rendered/$$o.yaml; \
	done

# Only the deploy checks.
test-deploy: build-debug deploy-tools
	ONETOKEN_DEPLOY_VENV=$(DEPLOY_VENV) $(PY) -m pytest -q tests/unit/test_deploy_files.py

test-rust:
	cargo test -q -p onetoken-gateway -p onetoken-mock-upstream

test-python: build-debug deploy-tools
	ONETOKEN_DEPLOY_VENV=$(DEPLOY_VENV) $(PY) -m pytest -q tests

# docs/analytics.md from a freshly migrated chDB, the engine's call_log declaration and the
# example queries; tests/unit/test_analytics_docs.py fails until it is regenerated after a
# change to any of them.
docs: build-debug
	$(PY) -m onetoken.analytics.docs docs/analytics.md

lint: $(VENV)/.lint-deps
	cargo clippy -q -p onetoken-gateway -p onetoken-mock-upstream -p onetoken-py -- -D warnings
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/mypy
	# The package is not installed before build-debug: import-linter finds it on PYTHONPATH.
	PYTHONPATH=python $(VENV)/bin/lint-imports --no-cache

bench: build-release
	$(PY) bench/run.py

bench-quick: build-release
	$(PY) bench/run.py --quick

# One, two and three gateways behind nginx, Redis off and on (bench/README.md). Not part of
# `make test`: it loads the machine for about three minutes.
bench-scale: build-release
	$(PY) bench/scale.py

# bench/locustfile.py's traffic mix through bench/loadtest.py (bench/README.md): reports in
# bench/out/locust-<time>/, exit 1 unless the run checks out. Without HOST, a throwaway local
# deployment with the mock upstream; with HOST (a gateway origin), ONETOKEN_API_KEYS or
# tenants made through CONTROL (or ONETOKEN_CONTROL_URL) as ONETOKEN_ADMIN_LOGIN and
# ONETOKEN_ADMIN_PASSWORD. Not part of `make test` (tests/integration/test_locust.py runs a
# 10-second one there).
USERS    ?= 20
DURATION ?=
SHAPE    ?= steady
HOST     ?=
CONTROL  ?=
TENANTS  ?= 4
locust: build-release
	$(PY) bench/loadtest.py --users $(USERS) --shape $(SHAPE) --tenants $(TENANTS) \
	  $(if $(DURATION),--duration $(DURATION)) $(if $(HOST),--host $(HOST)) \
	  $(if $(CONTROL),--control-url $(CONTROL))

# Dashboard queries raw and through the per-minute rollup on 100 million synthetic rows in
# chDB (bench/README.md). Not part of `make test`: several GB under /work/bench-data (or
# BENCH_DATA), deleted at the end, and an hour or more on 2 cores.
BENCH_DATA ?= /work/bench-data
bench-analytics: build-release
	nice -n 10 $(PY) bench/analytics.py --data-root $(BENCH_DATA)

# AFL++ on the parsers of untrusted bytes (rust/fuzz): each target in turn for FUZZ_SECONDS.
# Not part of `make test`. Findings land in rust/fuzz/out/<target>/default/crashes.
FUZZ_SECONDS    ?= 600
FUZZ_TARGETS    ?= sse json guard
FUZZ_TARGET_DIR ?= $(CURDIR)/rust/fuzz/target
fuzz:
	command -v cargo-afl >/dev/null || cargo install --locked cargo-afl
	cd rust/fuzz && CARGO_TARGET_DIR=$(FUZZ_TARGET_DIR) cargo afl build --release
	set -e; cd rust/fuzz; mkdir -p out; for t in $(FUZZ_TARGETS); do \
	  AFL_NO_UI=1 AFL_AUTORESUME=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 \
	  AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
	    cargo afl fuzz -V $(FUZZ_SECONDS) -i seeds/$$t -o out/$$t $(FUZZ_TARGET_DIR)/release/$$t >out-$$t.log 2>&1 \
	    || { tail -20 out-$$t.log; exit 1; }; \
	  echo "$$t: $$(grep -E '^(execs_done|corpus_count|saved_crashes|saved_hangs)' out/$$t/default/fuzzer_stats | tr -s ' ' | tr '\n' ' ')"; \
	done

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) target python/onetoken/_core*.so
