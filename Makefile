# Two commands do everything on a fresh machine with Python 3.12 (see README.md):
#   make demo   set up .venv and train on the embedded data set (scikit-learn's digits)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The test extra brings libtpu (for the --compile-only tests): without JAX_PLATFORMS, JAX would probe for a TPU
# at start-up and libtpu would print warnings on a machine that has none. The demo runs on the CPU.
demo: setup
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/python train.py --preset quick --workdir runs/quick

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
