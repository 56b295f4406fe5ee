# Two set-up commands for a new user: `make demo` (the main job) and `make test` (the tests).
# Both create .venv if missing and install the pinned CPU torch first, then fedumm.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedumm-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Each demo writes a new run directory (a finished run is never overwritten).
DEMO_OUT ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)

demo: $(STAMP)
	$(BIN)/fedumm run configs/quickstart.yaml --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs
