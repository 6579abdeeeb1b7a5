# Entry points: `make run` (main job on built-in data), `make test` (whole suite) and `make docs` (the site).
# Flags for the main job go in ARGS, e.g. `make run ARGS=--overwrite` or `make run ARGS="--resume --steps 1600"`;
# flags for the site builder in DOCS_ARGS, e.g. `make docs DOCS_ARGS=--no-api`.
PYTHON ?= python3
ARGS   ?=
DOCS_ARGS ?=
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

# Debian's chromium reads the site in tests/docs (and shows it); installed when missing (as root, or through sudo
# without a password). Where it cannot be installed, make goes on and the browser tests skip.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

.PHONY: run test docs venv test-deps docs-deps chromium clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	touch $@

$(VENV)/.test: $(VENV)/.core constraints.txt
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $@

# The site's packages (the docs extra; the test extra holds them too) over the test extra, whose torch,
# transformers and triton the notebooks in demos/ use.
$(VENV)/.docs: $(VENV)/.test
	$(PIP) install -c constraints.txt -e '.[docs]'
	touch $@

venv: $(VENV)/.core
test-deps: $(VENV)/.test
docs-deps: $(VENV)/.docs

chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; } || \
		echo "chromium could not be installed (apt-get failed): the browser tests in tests/docs will skip"

run: $(VENV)/.core
	$(PY) -m npformer train $(ARGS)

# loadgroup: tests marked with one xdist_group share a worker (tests/docs builds its site once)
test: $(VENV)/.test chromium
	$(PY) -m pytest -n 2 --dist loadgroup -q

# The documentation site into site/: derivations, README, notebooks (executed), API and source pages.
docs: $(VENV)/.docs chromium
	$(PY) proofs/site/build.py $(DOCS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site build/docs build/docs-cache
