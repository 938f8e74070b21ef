# The README's two commands: `make demo` and `make test`. Everything else is plumbing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint browser promtool bench clean constraints docker-test

# Two layers in one venv: what the bridge needs to run (`make demo` installs only that), and the
# dev extra on top (tests, linters, browser; everything else asks for it). `make .venv` is both.
RUN := $(VENV)/.run
DEV := $(VENV)/.dev

$(RUN): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $(RUN)

$(DEV): $(RUN)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(DEV)

$(VENV): $(DEV)

demo: $(RUN)
	$(BIN)/bridge demo

lint: $(DEV)
	$(BIN)/ruff format --check bridge tests bench
	$(BIN)/ruff check bridge tests bench
	$(BIN)/mypy --strict bridge

test: lint browser promtool
	$(BIN)/pytest

# The status page is tested in Debian's headless Chromium (driven by Python Playwright, no download).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# /metrics is checked with Prometheus's own promtool (Debian's prometheus package).
promtool:
	@command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus >/dev/null) \
		|| echo "promtool could not be installed: tests/test_metrics.py will skip its check" >&2

bench: $(DEV)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# -- pinned versions (constraints.txt) -------------------------------------------------------------
# constraints.txt pins every package `make test` (so CI) and the Dockerfile install. Refresh it after
# changing a range in pyproject.toml, or to take newer releases: a fresh venv gets the newest
# versions the ranges allow, and its `pip freeze` becomes the file. Then run `make test`.
constraints:
	rm -rf .constraints-venv build
	$(PYTHON) -m venv .constraints-venv
	.constraints-venv/bin/pip install -q --upgrade pip
	.constraints-venv/bin/pip install -q '.[dev]'
	{ echo "# The exact versions that \`make test\` (and so CI) and the Dockerfile install: pip install -c constraints.txt."; \
	  echo "# Written by \`make constraints\` (pip freeze of a fresh venv with '.[dev]' installed); don't edit by hand."; \
	  .constraints-venv/bin/pip freeze --exclude mj-bridge; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .constraints-venv build

# -- the container ---------------------------------------------------------------------------------
# Builds the Dockerfile and checks the running image (tests/test_docker.py); as root it installs and
# starts what is missing: Debian's docker.io engine, and a debootstrap stand-in for the base image
# where none can be pulled. What it checks and how: docs/operations.md, "Running in Docker".
docker-test: $(VENV)
	bash .ci/docker-test
