# Two entry points (README quick start): `make demo` runs the pipeline, `make test` the tests;
# `make lint` runs ruff (lint, format check) and mypy, as CI does before the tests.
# All first run `install`, which is idempotent: it apt-installs the system packages that are
# missing and pip-installs this project with its dev extras.
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist
export DVC_NO_ANALYTICS := 1
export NUMBA_THREADING_LAYER := omp

.PHONY: install demo test test-fast lint

install:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install $$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	$(PYTHON) -m pip install -q --disable-pip-version-check -e ".[dev]"

demo: install
	dvc repro
	@echo "Report: reports/summary.md (metrics: dvc metrics show; plots: dvc plots show)"

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow and not e2e"

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
