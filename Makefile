# kdengine developer entry points. `make test` works on a fresh machine: it installs what is
# missing (system packages when root: build tools and FFCV's OpenCV / libjpeg-turbo headers; a
# virtualenv, torch, FFCV, kdengine) and runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
JOBS ?= $(shell nproc)
PYTEST_ARGS ?=
TRAIN_ARGS ?=
BENCH_ARGS ?=
CSRC := $(shell find csrc -type f)
STAMP := $(VENV)/.kdengine-installed

.PHONY: setup test test-fast lint check-cuda-kernels cmake-check bench bench-step info train clean \
	gpu-wheels gpu-preflight gpu-check

setup: $(STAMP)

$(VENV)/bin/python:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in build-essential ninja-build cmake pkg-config libopencv-dev libturbojpeg0-dev; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python pyproject.toml setup.py $(CSRC)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q ninja pybind11 numpy rich omegaconf pyyaml matplotlib tensorboard pytest expecttest hypothesis triton
	$(BIN)/python -m pip install -q ffcv numba pillow opencv-python-headless  # needs the apt packages above
	@echo "compiling the C++ extension kdengine._C with $(JOBS) jobs (CPU kernels; the CUDA kernels too when nvcc is found):"
	@echo "about 5 minutes on 2 cores, silent until done"
	MAX_JOBS=$(JOBS) $(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]"
	@touch $@

# The suite: CPU kernels, Triton kernels under the interpreter, CUDA cases skip without a GPU.
test: setup check-cuda-kernels
	TRITON_INTERPRET=1 KDENGINE_REQUIRE_EXTENSION=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -m "not slow" -x $(PYTEST_ARGS)

# ruff (pyproject.toml [tool.ruff]): pycodestyle errors, pyflakes, import order.
lint: setup
	$(BIN)/ruff check .

# Every csrc/kernels/*.cuh compiles with nvcc for sm_80 and sm_90 (no GPU needed). Without nvcc it
# says so and skips, unless KDENGINE_REQUIRE_NVCC=1 (CI).
check-cuda-kernels:
	bash .ci/check_cuda_kernels.sh

# The CMake build of the same extension configures, builds and loads (CPU).
cmake-check: setup
	cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(BIN)/python) -DKDENGINE_WITH_CUDA=OFF
	cmake --build build/cmake -j $(JOBS)
	$(BIN)/python .ci/check_cmake_build.py build/cmake/kdengine/_C*.so

# The repository's results file; `kdengine bench` alone writes to ./kdengine-bench/.
bench: setup
	$(BIN)/kdengine bench ops --output benchmarks/results/ops.csv $(BENCH_ARGS)

# Whole training steps (eager fp32 / bf16, torch.compile, kdengine) into the repository's results.
bench-step: setup
	$(BIN)/kdengine bench step --output benchmarks/results/step.csv $(BENCH_ARGS)

# ---- GPU validation. A GPU machine (torch 2.11 + CUDA 13, Python 3.12, no network, no omegaconf) is
# lent for minutes: `make gpu-wheels` here downloads what its image lacks into .whl/ (git-ignored,
# carried to the machine), `make gpu-preflight` checks here what a CPU can, and on the GPU machine
# `make gpu-check` builds, tests, benchmarks and trains in one call (.ci/gpu_check.py, < 8 minutes,
# everything in $$OUT or gpu-check-out/, summary printed last).
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform any -d .whl omegaconf==2.3.0 expecttest==0.3.0
	# antlr4 4.9.3 (omegaconf's parser runtime) is published as an sdist only: build its pure-Python
	# wheel here, as the GPU machine cannot build one without an index.
	$(PYTHON) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
	@ls .whl

gpu-preflight: setup
	$(BIN)/python .ci/gpu_check.py --preflight

gpu-check:
	python3 .ci/gpu_check.py

# The embedded default: DML+ADM on the generated dataset, a few minutes on 2 CPU cores.
train: setup
	$(BIN)/kdengine train $(TRAIN_ARGS)

info: setup
	$(BIN)/kdengine info

clean:
	rm -rf build *.egg-info kdengine/_C*.so
