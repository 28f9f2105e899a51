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
CSRC := $(shell find csrc -type f)
STAMP := $(VENV)/.kdengine-installed

.PHONY: setup test test-fast check-cuda-kernels cmake-check bench info train clean

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
	MAX_JOBS=$(JOBS) $(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]"
	@touch $@

# The suite: CPU kernels, Triton kernels under the interpreter, CUDA cases skip without a GPU.
test: setup check-cuda-kernels
	TRITON_INTERPRET=1 KDENGINE_REQUIRE_EXTENSION=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -m "not slow" -x $(PYTEST_ARGS)

# Every csrc/kernels/*.cuh compiles with nvcc for sm_80 and sm_90 (no GPU needed).
check-cuda-kernels:
	bash .ci/check_cuda_kernels.sh

# The CMake build of the same extension configures, builds and loads (CPU).
cmake-check: setup
	cmake -S . -B build/cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(BIN)/python) -DKDENGINE_WITH_CUDA=OFF
	cmake --build build/cmake -j $(JOBS)
	$(BIN)/python .ci/check_cmake_build.py build/cmake/kdengine/_C*.so

bench: setup
	$(BIN)/kdengine bench ops

# The embedded default: DML+ADM on the generated dataset, a few minutes on 2 CPU cores.
train: setup
	$(BIN)/kdengine train $(TRAIN_ARGS)

info: setup
	$(BIN)/kdengine info

clean:
	rm -rf build *.egg-info kdengine/_C*.so
