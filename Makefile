# The two commands of the README. Each creates/updates .venv/ first (scripts/bootstrap.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
QUICKSTART_DIR ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: setup quickstart test bench clean

setup:
	@bash scripts/bootstrap.sh

quickstart: setup
	$(PY) -m megaflamingo.quickstart --out "$(QUICKSTART_DIR)"

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs/ .pytest_cache
