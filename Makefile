# What the README tells a newcomer to type. Everything installs into ./.venv on first use:
# the CPU wheel of torch (pinned so pip never pulls a multi-GB CUDA build), then rlkern itself
# (editable, built against that torch with --no-build-isolation) with its train/dev/bench extras.
# A GPU user who already has torch: `make setup PYTHON=/path/to/python VENV=/path/to/env`, or
# `pip install --no-build-isolation -e ".[train]"` in their own environment.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make train` starts the default run afresh each time (runs/rlhf); TRAIN_ARGS="--resume" continues it.
TRAIN_ARGS ?= --overwrite

.PHONY: setup build train test test-triton lint bench gpu-check clean

setup: $(VENV)/.rlkern-installed

$(VENV)/.rlkern-installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[train,dev,bench]"
# verl 0.9.1 for tests/test_compat_verl_installed.py (patch("verl") against the real package). Its metadata
# pins transformers<5.11 and ray[default], so verl and tensordict go in --no-deps and only the modules
# `import verl` and core_algos / torch_functional need follow (ray is ~240 MB of the ~280 MB added).
	$(PY) -m pip install --quiet --no-deps verl==0.9.1 tensordict==0.10.0
	$(PY) -m pip install --quiet ray==2.60.0 codetiming==1.4.0 hydra-core==1.3.8 omegaconf==2.3.1 \
		cloudpickle==3.1.3 orjson==3.13.0 "pyvers<0.2"
	touch $@ $(VENV)/.rlkern-built

# Rebuilds rlkern._C in place when a csrc/ file is newer than the last build (ninja recompiles only
# the files that changed), so train/test/bench always run the kernels in the tree; the first
# install's own build counts as the last build. Make looked at the stamp before the install's recipe
# wrote it, so on a fresh machine it would build a second time: the recipe looks again when it runs.
# flock serialises concurrent builds of the same tree.
build: $(VENV)/.rlkern-built

$(VENV)/.rlkern-built: $(VENV)/.rlkern-installed $(wildcard csrc/*.cpp csrc/*.h) rlkern/codes.py
	@if [ -f $@ ] && [ -z "$$(find csrc rlkern/codes.py -newer $@ \( -name '*.cpp' -o -name '*.h' -o -name codes.py \))" ]; then \
		echo "rlkern._C is up to date (built by the install)"; \
	else \
		flock /tmp/rlkern-build.lock $(PY) setup.py build_ext --inplace && touch $@; \
	fi

train: build
	$(PY) -m rlkern.train $(TRAIN_ARGS)

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The Triton kernels on CPU tensors through the interpreter (also part of `make test`).
test-triton: build
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton $(PYTEST_ARGS)

# ruff with pyproject.toml's rules (110 columns); .ci/run runs it after the tests.
lint: $(VENV)/.rlkern-installed
	$(PY) -m ruff check .

bench: build
	$(PY) -m benchmarks

# On a CUDA machine, with the python whose torch you use (PYTHON=...): build rlkern._C against it
# (no network), the suite on CUDA tensors, the GPU benchmark and a 3-step GRPO run on the GPU; all
# output in GPU_CHECK_OUT (default: the env var RLKERN_GPU_CHECK_OUT, else gpu-check/). See benchmarks/gpu_check.py.
# Without a CUDA device it says so in one line and exits 2.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT))

clean:
	rm -rf build dist *.egg-info rlkern/_C*.so
