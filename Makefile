# Glimpse: the two quick-start commands, and the install they share.
#   make demo   - train the video demo (local Ray, local MLflow, synthetic clips made if absent)
#   make test   - the whole test suite (integration tests with a real Ray head and MLflow server included)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# PyTorch first, pinned to the tested pair (CUDA build on x86_64; runs on CPU too).
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python jobs/train_kinetics.py

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
