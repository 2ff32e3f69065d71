# The README's two commands: `make test` and `make bench`.
PYTHON ?= python3
BUILD_DIR ?= build
JOBS ?= 2
INSTALL_DIR := $(abspath $(BUILD_DIR))/install
CONSUMER_DIR := $(BUILD_DIR)/consumer
TORCH_PREFIX = $(shell $(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')
LAUNCHER = $(if $(shell command -v ccache),-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)

.PHONY: all setup configure build python test test-cpp test-install test-python bench format clean

all: build

setup:
	@PYTHON=$(PYTHON) bash scripts/setup.sh

configure: setup
	cmake -S . -B $(BUILD_DIR) -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" $(LAUNCHER)

build: configure
	cmake --build $(BUILD_DIR) -j$(JOBS)

test: test-cpp test-install test-python

test-cpp: build
	ctest --test-dir $(BUILD_DIR) --output-on-failure -j$(JOBS)

# Installs into a prefix, then builds and runs examples/ as an outside
# project would: find_package(dopamine), link dopamine::dopamine.
test-install: build
	cmake --install $(BUILD_DIR) --prefix $(INSTALL_DIR)
	cmake -S examples -B $(CONSUMER_DIR) $(LAUNCHER) \
	  -DCMAKE_PREFIX_PATH="$(INSTALL_DIR);$(TORCH_PREFIX)"
	cmake --build $(CONSUMER_DIR) -j$(JOBS)
	$(CONSUMER_DIR)/xor_train
	$(CONSUMER_DIR)/train_torchscript - 500

# The Python package, built by scikit-build-core from this CMakeLists.txt
# against the torch already installed.
python: setup
	CMAKE_CXX_COMPILER_LAUNCHER=$(if $(shell command -v ccache),ccache) \
	  $(PYTHON) -m pip install -q --no-build-isolation .

# Needs the C++ build too: the parity test runs examples/ from it.
test-python: build python
	DOPAMINE_BUILD_DIR=$(BUILD_DIR) $(PYTHON) -m pytest -q -rs tests/python

bench: build
	@mkdir -p results
	$(BUILD_DIR)/benchmarks/cpp/dopamine_bench_xor | tee results/xor_cpp.md

format:
	clang-format -i $$(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')

clean:
	rm -rf $(BUILD_DIR)
