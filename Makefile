# The two commands of the README. Each creates/updates .venv/ first (scripts/bootstrap.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
QUICKSTART_DIR ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: setup quickstart demo test bench clean

setup:
	@bash scripts/bootstrap.sh

quickstart: setup
	$(PY) -m megaflamingo.quickstart --out "$(QUICKSTART_DIR)"

# The web demo on the quickstart's model: what `make quickstart` prints at its end.
demo: setup
	$(PY) -m megaflamingo.cli.demo --model "$(QUICKSTART_DIR)/export" \
	  --icl-from "$(QUICKSTART_DIR)/arrow/SynthSounds-EventClassification/train" \
	  --icl-audio-root "$(QUICKSTART_DIR)/data"

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs/ .pytest_cache
