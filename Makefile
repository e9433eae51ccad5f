# jepa-lightning — every target sets up .venv on first use (Python 3.11, CPU torch first).
PYTHON ?= python3.11
TORCH  ?= torch==2.13.0
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test-upgrade quickstart study-quick synthetic-study-quick synthetic-study pretext-study findings longitudinal-study-quick longitudinal-study test test-full lint format bench bench-data clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install torch ($(TORCH)) then the project with dev extras

quickstart: $(STAMP) ## Synthetic cohort -> JEPA pretrain -> finetune (JEPA init vs scratch) -> results table
	$(PY) -m jepa_lightning.evaluation.study --config experiments/studies/quickstart.yaml

synthetic-study-quick: $(STAMP) ## Synthetic environment study, quick: report.md + knobs.png in runs/synthetic-study-quick
	$(PY) -m jepa_lightning.evaluation.synthetic_study --config experiments/synthetic_study/quick.yaml

synthetic-study: $(STAMP) ## Synthetic environment study: the paper's three findings on the quickstart cohort, 3 seeds: runs/synthetic-study
	$(PY) -m jepa_lightning.evaluation.synthetic_study --config experiments/synthetic_study/full.yaml

pretext-study: $(STAMP) ## "Pretext Matters": JEPA vs MSN / CLIP probes, label signal global vs local: runs/synthetic-study-pretext
	$(PY) -m jepa_lightning.evaluation.synthetic_study --config experiments/synthetic_study/pretext.yaml

findings: $(STAMP) ## The README's findings table, rebuilt from the study snapshots in experiments/findings/ (no training)
	$(PY) -m jepa_lightning.evaluation.findings table --write README.md

longitudinal-study-quick: $(STAMP) ## Longitudinal study, quick (~10 min on 2 cores): runs/longitudinal-quick/report.md
	$(PY) -m jepa_lightning.evaluation.synthetic_study --config experiments/longitudinal/quick.yaml

longitudinal-study: $(STAMP) ## Longitudinal study, full (3 seeds, 2 label fractions; ~28 min): runs/longitudinal-full
	$(PY) -m jepa_lightning.evaluation.synthetic_study --config experiments/longitudinal/full.yaml

study-quick: $(STAMP) ## Small study grid on the synthetic cohort (CPU): table, ROC curves, t-SNE in runs/study-quick
	$(PY) -m jepa_lightning.evaluation.study --config experiments/studies/quick.yaml

test: $(STAMP) ## Default test suite (no slow tests)
	WANDB_MODE=offline $(PY) -m pytest -q

UPGRADE_VENV := .venv-upgrade
test-upgrade: ## A second env (.venv-upgrade) with the newest releases pyproject.toml allows, and the suite there
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found"; exit 1; }
	@test -x $(UPGRADE_VENV)/bin/python || $(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade pip
	$(UPGRADE_VENV)/bin/python -m pip install -q "$(TORCH)"
	@# torch stays the build just installed (a newer one from PyPI is a multi-GB CUDA wheel);
	@# every other dependency moves to the newest release its range allows.
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]' \
		"torch==$$($(UPGRADE_VENV)/bin/python -c 'import torch; print(torch.__version__)')"
	$(UPGRADE_VENV)/bin/python -m pip list 2>/dev/null | grep -Ei '^(torch|lightning|torchmetrics|monai|jsonargparse|numpy|pandas) '
	WANDB_MODE=offline $(UPGRADE_VENV)/bin/python -m pytest -q

test-full: $(STAMP) ## Every test, the slow ones included
	WANDB_MODE=offline $(PY) -m pytest -q -m ''

lint: $(STAMP) ## ruff check + format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP) ## ruff autofix + format
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP) ## Benchmarks under experiments/benchmarks (prints a table)
	$(PY) -m experiments.benchmarks.run_all

bench-data: $(STAMP) ## Disk cache vs decoding (N=500 SIZE=128); one 512x512x300 CT to a crop, before/after
	$(PY) -m experiments.benchmarks.data_cache --n-scans $(or $(N),500) --size $(or $(SIZE),128)
	$(PY) -m experiments.benchmarks.real_size --repeats $(or $(REPEATS),3)

clean: ## Remove run outputs (never the .venv)
	rm -rf runs .pytest_cache
