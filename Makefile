# pyra_bench developer commands. `make demo` and `make test` create the environment in .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Extra pip arguments, e.g. PIP_ARGS="--index-url https://download.pytorch.org/whl/cu124" for a CUDA build.
PIP_ARGS ?=

.PHONY: venv demo test test-fast bench bench-train tables lint prepare-vtab info clean help

help:
	@echo "make demo       - create .venv if needed and run the offline demo (python -m pyra_bench.train)"
	@echo "make test       - create .venv if needed and run the test suite"
	@echo "make bench      - CPU throughput/FLOPs benchmark of every method at low/high (results/bench/)"
	@echo "make bench-train - CPU training-step speed of PEFT vs ToMe/PYRA at low/high (results/bench/)"
	@echo "make tables     - rebuild the paper's tables/figures from results/runs (\$$PYRA_RESULTS) into results/tables"
	@echo "make prepare-vtab TASKS=all DATA_ROOT=data/vtab-1k - build VTAB-1k folders from TFDS (TASKS=cifar100,dtd: several)"
	@echo "make info       - list backbones, methods, tasks and experiments (python -m pyra_bench.info)"
	@echo "make lint       - ruff"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install $(PIP_ARGS) -e ".[dev]" --config-settings editable_mode=compat
	@touch $(STAMP)

venv: $(STAMP)

# Extra overrides of the demo run, e.g. DEMO_ARGS=trainer=smoke (two short epochs: what the test suite runs).
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m pyra_bench.train $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) scripts/bench_speedup.py

bench-train: $(STAMP)
	$(PY) scripts/bench_training.py

# Where runs write their records (PYRA_RESULTS, as conf/train.yaml's results_dir) and where the tables go.
RECORDS    ?= $(or $(PYRA_RESULTS),results/runs)
TABLES_OUT ?= $(or $(PYRA_TABLES),results/tables)
tables: $(STAMP)
	$(PY) -m pyra_bench.tables records=$(RECORDS) out=$(TABLES_OUT)

TASKS ?= all
DATA_ROOT ?= data/vtab-1k
prepare-vtab: $(STAMP)
	$(PY) -m pyra_bench.data.prepare 'tasks=[$(TASKS)]' data_root=$(DATA_ROOT)

info: $(STAMP)
	$(PY) -m pyra_bench.info

lint: $(STAMP)
	$(VENV)/bin/ruff check pyra_bench tests scripts

clean:
	rm -rf outputs multirun results/tables .pytest_cache
