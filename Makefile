# Two entry points a new user needs: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
VENV ?= .venv
# An exact torch version: pip takes the CPU wheel where one lies on disk (this project's
# CI machines) and PyPI's CUDA wheel on a machine with an NVIDIA GPU.
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.cohort-installed

.PHONY: setup demo test benchmark clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/cohort simulate

test: setup
	$(BIN)/python -m pytest

benchmark: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) runs .pytest_cache
