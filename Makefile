# `make test` works on a fresh machine with only Python: it creates .venv, installs a torch
# (TORCH_SPEC, CPU build by default), the project with its test extras, and runs the suite.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv test test-slow lint format bench demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# A torch already in the venv is kept, so GPU users can install their own build first.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

format: venv
	$(VENV)/bin/ruff format src tests benchmarks scripts
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts

bench: venv
	$(PY) benchmarks/layers.py

# Fashion-MNIST comes from its official site or, where web downloads are blocked, from Debian's
# dataset-fashion-mnist package (apt needs current package lists: apt-get update, as root).
demo: venv
	$(PY) -m structlin_lab data fetch fashion_mnist || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    $(PY) -m structlin_lab data fetch fashion_mnist; }
	$(PY) -m structlin_lab demo

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
