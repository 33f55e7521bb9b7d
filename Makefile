PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-reliability soak demo bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check bettensor_ws tests benchmarks
	$(BIN)/mypy --strict bettensor_ws
	$(BIN)/mypy --check-untyped-defs tests
	$(BIN)/mypy --strict tests/typing/api_snippet.py

test: lint
	$(BIN)/pytest

# The long forms of the reliability suite; a short form of each runs in `make test`.
test-reliability: venv
	$(BIN)/pytest -m reliability

# 64 miners for 10 minutes: memory, errors and latency over time (not in CI).
soak: venv
	$(BIN)/pytest -m soak -s

demo: venv
	$(BIN)/bettensor-ws demo

# All three run; the exit status is micro.py's (limits.py prints ceilings, run.py reports its targets; both exit 0).
bench: venv
	status=0; $(BIN)/python benchmarks/micro.py || status=$$?; \
	$(BIN)/python benchmarks/limits.py && \
	$(BIN)/python benchmarks/run.py && exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
