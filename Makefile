# megdet_hpc: `make demo` (set-up + train/evaluate the demo detector), `make test` (set-up + lint + tests).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff
# Test workers (pytest-xdist; 0 = none).  Whole modules go to whichever worker is free and every module
# that needs a Slurm cluster to one worker (tests/conftest.py).  On 2 cores the suite is CPU-bound (rank
# processes importing torch, tiny trainings), so two workers gain little there; more cores, more gain.
TEST_WORKERS ?= 2

.PHONY: setup test test-gpu lint demo bench experiment parity parity-long parity-ablation slurm-scripts

setup:
	bash scripts/setup.sh

# Every tracked Python file, named explicitly: ruff's default excludes (dist/, build/, ...) never apply.
lint: setup
	git ls-files -z '*.py' | xargs -0 $(RUFF) check
	git ls-files -z '*.py' | xargs -0 $(RUFF) format --check

test: setup lint
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=25 tests

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

bench: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash bench/run_all.sh

# GPU tests (pytest -m gpu; they skip only where CUDA is absent) -- on a GPU machine, see bench/gpu.sh.
test-gpu: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -m gpu tests

# MegDet's table: batch size x BN size x warmup on the embedded data; runs only those not yet in
# experiments/results/megdet_table.json (all 16 are recorded there; ~13-16 min a run on 2 cores).
experiment: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m megdet_hpc.experiments.megdet_table

# AP parity with torchvision's reference detection loop: 2 systems x 3 seeds, both systems of a seed
# at once (~70 min per seed on 2 cores, ~3.5 h in all: experiments/results/parity.md).
parity: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m megdet_hpc.experiments.parity

# The same comparison 4 times longer (2400 images), where the seed spread is small: ~50 min on 2 cores.
parity-long: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m megdet_hpc.experiments.parity --train-images 404 --epochs 6 \
		--step-epoch 5 --data datasets/synthetic_404 --out output/experiments/parity_long \
		--results experiments/results/parity_long

# parity-long's megdet_hpc again with torchvision's RPN/RoI samplers, beside the committed curves:
# does the sampler explain megdet_hpc's lead mid-schedule?  3 runs, ~40 min on 2 cores.
parity-ablation: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m megdet_hpc.experiments.parity_ablation --swap samplers \
		--train-images 404 --epochs 6 --step-epoch 5 --data datasets/synthetic_404 \
		--out output/experiments/parity_ablation --parity-results experiments/results/parity_long

slurm-scripts: setup
	$(PY) -m megdet_hpc.launch sbatch --regenerate-committed
