# Two set-up commands on a fresh machine: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test lint clean notebook notebook-docs

$(STAMP): setup.py tests/reference-requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/reference -r tests/reference-requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ediffi_jax.cli.demo --out demo_out/demo.png

lint: $(STAMP)
	$(VENV)/bin/ruff check ediffi_jax configs tests bench notebooks

test: $(STAMP) lint
	$(VENV)/bin/pytest tests --durations=15

notebook: $(STAMP)  # rebuild notebooks/quickstart.ipynb from notebooks/build_quickstart.py
	$(PY) notebooks/build_quickstart.py

notebook-docs: $(STAMP)  # execute it and save the executed copy to docs/quickstart_executed.ipynb
	EDIFFI_SAVE_NOTEBOOK=1 $(VENV)/bin/pytest tests/test_notebook.py

clean:
	rm -rf .jax_cache workdirs demo_out
