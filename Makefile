# `make demo` and `make test` do all the set-up on a fresh machine (Python >= 3.10 with venv).
# The default torch is the CPU build; on a GPU machine: `make setup TORCH_SPEC=torch` after
# installing the CUDA build of torch you want, or see README.md.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.dsgraph-installed

.PHONY: setup demo test check lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)" -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/dsgraph compile pipelines/distill.dsg --world-size 2
	$(BIN)/dsgraph run pipelines/distill.dsg --procs 2 --run-dir runs/demo-distill

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The inner loop (well under a minute): lint, types, and every test that starts no other process.
check: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not runtime and not spawns and not gpu"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/compile_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
