# Two entry points: `make run` (main job on built-in data) and `make test` (whole suite).
# Flags for the main job go in ARGS, e.g. `make run ARGS=--overwrite` or `make run ARGS="--resume --steps 1600"`.
PYTHON ?= python3
ARGS   ?=
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test venv test-deps clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	touch $@

$(VENV)/.test: $(VENV)/.core constraints.txt
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.core
test-deps: $(VENV)/.test

run: $(VENV)/.core
	$(PY) -m npformer train $(ARGS)

test: $(VENV)/.test
	$(PY) -m pytest -n 2 -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
