# kvserve: `make serve` to run the server, `make test` to run the tests. Needs Python 3.11 and make.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
MODEL ?= smollm2-135m
PYTEST_ARGS ?=

.PHONY: serve test test-fast test-avx2 test-soak lint venv dev-deps model bytecode cpu-features bench bench-peers profile clean

$(BIN)/kvserve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

venv: $(BIN)/kvserve

$(VENV)/.dev-deps: $(BIN)/kvserve
	$(BIN)/pip install -q -e '.[dev]'
	scripts/install_browser.sh $(BIN)
	touch $@

dev-deps: $(VENV)/.dev-deps

model: venv  ## fetch the default model into $$KVSERVE_HOME (~/.cache/kvserve) unless it is there
	$(BIN)/kvserve pull $(MODEL)

# pip byte-compiles a regular install (the image's), not an editable one; and where PYTHONDONTWRITEBYTECODE is set
# (the development VMs) Python never writes the .pyc itself, so every start compiled kvserve's ~90 modules
# again: ~0.1 s of a 2 s cold start. Cheap when they are up to date.
bytecode: venv  ## byte-compile engine/ and service/ for faster starts
	$(BIN)/python -m compileall -q engine service

cpu-features: venv  ## the CPU features detected, the default CPU weight format and the formats refused here
	$(BIN)/kvserve cpu-features

serve: model bytecode  ## serve the default model on http://127.0.0.1:$(PORT)
	$(BIN)/kvserve serve --model $(MODEL) --port $(PORT)

test: dev-deps model  ## unit, integration and browser tests, plus the deployment checks
	$(BIN)/ruff check engine service bench tests
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-avx2
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/check_deploy.sh

# The kernel tests again, kvserve's kernels built for x86-64-v3 (AVX2, FMA, F16C) and PyTorch's ops on their AVX2
# code: what an AVX2-only CPU (AMD Zen 2/3, Intel before Ice Lake) runs, checked on whatever CPU CI has.
AVX2_TESTS = tests/unit/test_w4a16_matmul.py tests/unit/test_w4a8_matmul.py tests/unit/test_q8_matmul.py tests/unit/test_int4_gemv.py \
	tests/unit/test_cpu_matmul.py tests/unit/test_paged_decode.py tests/unit/test_decode_graph.py \
	tests/unit/test_speculative.py
test-avx2: dev-deps model  ## the kernel tests as an AVX2-only CPU builds and runs them (~1 minute)
	@if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then \
		KVSERVE_KERNEL_MARCH=x86-64-v3 ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -q $(AVX2_TESTS); \
	else echo "test-avx2: this CPU has no AVX2, nothing to emulate"; fi

test-fast: dev-deps  ## the tests that need no real model
	$(BIN)/python -m pytest -q -m 'not slow and not e2e' tests/unit

test-soak: dev-deps model  ## 200 concurrent clients with faults against a live server (~10-20 min on 2 cores)
	$(BIN)/python -m pytest -q -s -m soak --timeout 2400 tests/integration/test_soak.py

lint: dev-deps
	$(BIN)/ruff check engine service bench tests

clean:
	rm -rf $(VENV) .pytest_cache artifacts

include deploy/check.mk
-include bench/bench.mk
