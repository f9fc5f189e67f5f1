# make demo   - set up a virtual environment (CPU torch) and run the toy lab (examples/toy/train.py)
# make test   - set up the same environment and run the test suite and the docstring examples
# make lint   - ruff (lint and format check; make test runs it first)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.trajflow-installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml requirements/data.txt scripts/setup.sh
	VENV=$(VENV) scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/toy/train.py --density checkerboard --out outputs/toy-checkerboard --resume  # a rerun continues, never overwrites

test: lint
	$(BIN)/python -m pytest tests --doctest-modules trajflow examples/toy examples/t2i

lint: $(STAMP)
	$(BIN)/ruff check trajflow tests benchmarks examples
	$(BIN)/ruff format --check trajflow tests benchmarks examples

clean:
	rm -rf $(VENV) outputs
