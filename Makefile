# megdet_hpc: `make demo` (set-up + train/evaluate the demo detector), `make test` (set-up + lint + tests).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff

.PHONY: setup test lint demo bench slurm-scripts clean-outputs

setup:
	bash scripts/setup.sh

# Every tracked Python file, named explicitly: ruff's default excludes (dist/, build/, ...) never apply.
lint: setup
	git ls-files -z '*.py' | xargs -0 $(RUFF) check
	git ls-files -z '*.py' | xargs -0 $(RUFF) format --check

test: setup lint
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q tests

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

bench: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash bench/run_all.sh

slurm-scripts: setup
	$(PY) -m megdet_hpc.slurm --regenerate-committed
