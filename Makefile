# The README's two commands: `make demo` and `make test`. Everything else is plumbing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

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

test: lint
	$(BIN)/pytest

bench: $(VENV)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
