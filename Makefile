# Two set-up commands, both creating .venv with pinned versions (constraints.txt):
#   make demo   run the main job end to end on a built-in synthetic archive
#   make test   run the test suite (CPU only)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
DEMO_CASES ?= 100
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

# torch==2.13.0 is pinned in constraints.txt: that is the CPU build on the dev machine's disk
# (an unpinned torch pulls a multi-GB CUDA build). The library requires only torch>=2.8.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

demo: $(STAMP)
	bash bundles/demo.sh $(DEMO_DIR) $(DEMO_CASES)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
