# The two commands of the README, each setting everything up in a local virtualenv first:
#   make demo   prepare tiny Shakespeare, train the single-core GPT briefly, print a sample
#   make test   the whole test suite: unit tests, MPI runs, notebooks
# CORPUS=path/to/input.txt uses a local copy of tiny Shakespeare instead of downloading it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORPUS ?=
DEMO_ITERS ?= 1000

.PHONY: install data demo test bench-defaults figures notebooks clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

data: install
	$(PY) data/prepare.py $(if $(CORPUS),--source "$(CORPUS)")

demo: data
	$(PY) 01_single_core/train.py --max-iters $(DEMO_ITERS) --lr-decay-iters $(DEMO_ITERS) \
		--eval-interval 200 --out-dir out/demo
	$(PY) 01_single_core/sample.py --out-dir out/demo --max-new-tokens 400

# the real-corpus check of data preparation runs on the copy prepare.py keeps
test: data
	CORPUS="$(or $(CORPUS),data/shakespeare_char/input.txt)" $(PY) -m pytest

# the README's parallel commands with no thread variables beside one BLAS thread per rank, side by side
bench-defaults: data
	$(PY) bench/thread_defaults.py --old-default

# the figures the READMEs show and the bug gallery, regenerated from real runs (about 4 minutes)
figures: data
	$(PY) bench/figures.py

# every chapter notebook executed in place, its outputs (plots, checks) saved for readers on the web (~2.5 minutes)
notebooks: data
	$(PY) bench/notebooks.py

clean:
	rm -rf $(VENV) out data/shakespeare_char
