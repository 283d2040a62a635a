# One entry for each chore. `make up` and `make test` install whatever is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: up test lint format bench fuzz system-deps test-system-deps clean

up: system-deps $(BIN)/.installed node_modules/.installed
	$(BIN)/remotecli up $(ARGS)

test: test-system-deps $(BIN)/.installed node_modules/.installed lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: test-system-deps $(BIN)/.installed node_modules/.installed
	$(BIN)/python -m bench $(ARGS)

# A longer coverage-guided run of the gateway's request-head fuzzer (FUZZ_SECONDS, default 600);
# new inputs go to test-artifacts/fuzz/corpus, crashes to test-artifacts/fuzz/.
FUZZ_SECONDS ?= 600
fuzz: $(BIN)/.installed
	mkdir -p test-artifacts/fuzz/corpus
	$(BIN)/python tests/fuzz/fuzz_gateway.py -max_total_time=$(FUZZ_SECONDS) -max_len=65536 \
		-dict=tests/fuzz/http.dict -artifact_prefix=test-artifacts/fuzz/ \
		test-artifacts/fuzz/corpus tests/fuzz/corpus

system-deps:
	scripts/install-system-deps.sh run

test-system-deps:
	scripts/install-system-deps.sh test

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,cluster]'
	touch $@

node_modules/.installed: package.json package-lock.json scripts/install-node-for-clis.sh
	npm ci --no-audit --no-fund --loglevel=error
	scripts/install-node-for-clis.sh
	touch $@

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache test-artifacts
