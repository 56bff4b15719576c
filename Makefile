# defect-loop: `make demo` runs the loop, `make test` runs the checks. Both create what they need.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install label-studio chromium lint format test test-unit demo clean

help:
	@echo "make demo        synthetic project + local Label Studio + one cycle (AUTO=1: labeler simulated, 3 cycles)"
	@echo "make test        lint, type-check and run the whole test suite (starts Label Studio itself)"
	@echo "make test-unit   only the fast unit tests"
	@echo "make install     create $(VENV) and the Label Studio server's own venv"
	@echo "make clean       remove $(VENV) and caches (keeps the Label Studio venv in ~/.cache)"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	# pip (not uv/poetry): torch/torchvision come from local disk under pip's constraints.
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) label-studio

label-studio: $(STAMP)
	$(BIN)/python -c "from loop.services import install_label_studio; install_label_studio()"

# Headless Chromium (Debian packages) for the report's browser test.
chromium:
	scripts/install-chromium.sh

lint: $(STAMP)
	$(BIN)/ruff check loop flows tests bench
	$(BIN)/ruff format --check loop flows tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format loop flows tests bench
	$(BIN)/ruff check --fix loop flows tests bench

test: install chromium lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

demo: install
	$(BIN)/defect-loop demo $(if $(AUTO),--auto,)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
