# megdet_hpc: `make demo` (set-up + train/evaluate the demo detector), `make test` (set-up + lint + tests).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff

.PHONY: setup test lint demo bench slurm-scripts clean-outputs

setup:
	bash scripts/setup.sh

lint: setup
	$(RUFF) check megdet_hpc tests bench
	$(RUFF) format --check megdet_hpc tests bench

test: setup lint
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q tests

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

bench: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash bench/run_all.sh

slurm-scripts: setup
	$(PY) -m megdet_hpc.slurm --regenerate-committed
