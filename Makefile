# Two set-up commands on a fresh machine: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test lint clean

$(STAMP): setup.py tests/reference-requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/reference -r tests/reference-requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ediffi_jax.cli.demo --out demo_out/demo.png

lint: $(STAMP)
	$(VENV)/bin/ruff check ediffi_jax configs tests bench

test: $(STAMP) lint
	$(VENV)/bin/pytest tests

clean:
	rm -rf .jax_cache workdirs demo_out
