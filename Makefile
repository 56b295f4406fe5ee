# Two set-up commands for a new user: `make demo` (the main job) and `make test` (the tests).
# Both create .venv if missing and install the pinned CPU torch first, then fedumm.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedumm-installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedumm data preview --out runs/preview

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs
