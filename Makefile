PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check bettensor_ws tests benchmarks
	$(BIN)/mypy --strict bettensor_ws

test: lint
	$(BIN)/pytest

demo: venv
	$(BIN)/bettensor-ws demo

bench: venv
	$(BIN)/python benchmarks/micro.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
