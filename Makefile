# The README's two commands: `make demo` and `make test`. Everything else is plumbing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint browser promtool bench clean

$(VENV): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(VENV)

demo: $(VENV)
	$(BIN)/bridge demo

lint: $(VENV)
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

bench: $(VENV)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
