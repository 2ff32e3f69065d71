# The README's two commands: `make test` and `make bench`.
PYTHON ?= python3
BUILD_DIR ?= build
JOBS ?= 2
INSTALL_DIR := $(abspath $(BUILD_DIR))/install
CONSUMER_DIR := $(BUILD_DIR)/consumer
TORCH_PREFIX = $(shell $(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')
LAUNCHER = $(if $(shell command -v ccache),-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)

.PHONY: all setup configure build python test test-cpp test-install test-python test-sanitize bench bench-tune bench-finetune-budget bench-full check-cuda-build format clean

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

# The C++ suite built with AddressSanitizer and UndefinedBehaviorSanitizer,
# in its own build tree (libtorch itself is not instrumented).
SANITIZE_DIR := $(BUILD_DIR)/sanitize
test-sanitize: setup
	cmake -S . -B $(SANITIZE_DIR) -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" $(LAUNCHER) \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDOPAMINE_SANITIZE=address,undefined \
	  -DDOPAMINE_CUDA=OFF -DDOPAMINE_BUILD_BENCHMARKS=OFF -DDOPAMINE_BUILD_EXAMPLES=OFF
	cmake --build $(SANITIZE_DIR) -j$(JOBS) --target dopamine_all_tests
	UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --test-dir $(SANITIZE_DIR) --output-on-failure -j$(JOBS)

# Installs into a prefix, then builds and runs examples/ as an outside
# project would: find_package(dopamine), link dopamine::dopamine.
test-install: build
	cmake --install $(BUILD_DIR) --prefix $(INSTALL_DIR)
	cmake -S examples -B $(CONSUMER_DIR) $(LAUNCHER) \
	  -DCMAKE_PREFIX_PATH="$(INSTALL_DIR);$(TORCH_PREFIX)"
	cmake --build $(CONSUMER_DIR) -j$(JOBS)
	$(CONSUMER_DIR)/xor_train
	$(CONSUMER_DIR)/train_torchscript - 500
	if [ -x $(CONSUMER_DIR)/data_parallel ]; then \
	  $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=2 --no-python \
	    $(CONSUMER_DIR)/data_parallel; fi

# The Python package, built by scikit-build-core from this CMakeLists.txt
# against the torch already installed.
python: setup
	CMAKE_CXX_COMPILER_LAUNCHER=$(if $(shell command -v ccache),ccache) \
	  $(PYTHON) -m pip install -q --no-build-isolation .

# Needs the C++ build too: the parity test runs examples/ from it.
test-python: build python
	DOPAMINE_BUILD_DIR=$(BUILD_DIR) $(PYTHON) -m pytest -q -rs tests/python

# The suite: the C++ XOR benchmark ($(1) steps at most) and the C++
# breakdown of a CPU op, then the Python suite (options $(2)), which merges
# them into results/bench.json and writes results/REPORT.md and the plots.
define run_bench
	@mkdir -p results
	$(BUILD_DIR)/benchmarks/cpp/dopamine_bench_xor 20 $(1) results/bench_cpp.json
	$(BUILD_DIR)/benchmarks/cpp/dopamine_bench_noise results/noise_cpp.json
	$(PYTHON) benchmarks/python/run_suite.py $(2) --out results \
	  --cpp-json results/bench_cpp.json --noise-json results/noise_cpp.json
endef

# Quick: 19.2 minutes whole on 2 cores on 2026-12-07 22:18 on an AVX-512 VM
# (Intel Xeon; the first run there, so with the 1.5-minute pretraining of the
# fine-tuning tasks' model, which later runs take from results/lm_cache);
# 35.8 (35.2 the suite) at 13:52 on an AVX2 VM; nothing else running either
# time. Scores every optimizer at the configuration benchmarks/tuned.json
# holds for it.
bench: build python
	$(call run_bench,2000,)

# Reruns the tuning of the quick tasks (make bench's contenders: 5 learning
# rates x 2 schedules x 3 tuning seeds) and of the directions study, and
# rewrites benchmarks/tuned.json: 96.1 minutes whole on 2 cores on 2026-12-07
# 22:19 on an AVX-512 VM, nothing else running; about 3 to 4 hours on an
# AVX2 VM, where XOR took 5.0 minutes, digits 25.7 and spirals 27.1. Choices
# sensitive to rounding differ between CPUs (docs/BENCHMARKS.md, "The
# committed tuning and a whole retune").
# Retuning some contenders, the evidence contenders included:
# `run_suite.py --tune --contenders NAME...`, which retunes the directions
# study's methods of those names too (64 minutes for dopamine and
# dopamine[lowrank] on 2026-12-07, beside builds).
bench-tune: build python
	$(PYTHON) benchmarks/python/run_suite.py --tune

# Fine-tuning with adapters, the forward-only contenders at ten times the
# gradient references' forward passes (benchmarks/python/finetune_budget.py):
# 69 minutes on 2 cores on 2026-12-07, most of it beside a CI run.
bench-finetune-budget: build python
	$(PYTHON) benchmarks/python/finetune_budget.py --out results

# The paper-size configurations (512-unit RNNs, 2000 epochs): hours on a CPU.
bench-full: build python
	$(call run_bench,5000,--full)

# Compiles the CUDA kernels against the CUDA build of torch 2.14.1 (from the
# local package mirror, into its own virtual environment), with this
# machine's nvcc. Nothing CUDA runs here; skipped without nvcc.
CUDA_VENV := $(BUILD_DIR)/cuda-venv
NVCC := $(shell command -v nvcc)
# The toolkit's root: $CUDA_HOME, else /usr/local/cuda, else above nvcc
# (which may be a wrapper script elsewhere).
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,$(abspath $(dir $(realpath $(NVCC)))..))
check-cuda-build:
ifeq ($(NVCC),)
	@echo "check-cuda-build: no nvcc; skipped"
else
	test -x $(CUDA_VENV)/bin/python || ( $(PYTHON) -m venv $(CUDA_VENV) && \
	  $(CUDA_VENV)/bin/pip install -q torch==2.14.1 )
	TORCH_CUDA_ARCH_LIST=9.0 cmake -S . -B $(BUILD_DIR)/cuda $(LAUNCHER) \
	  -DCMAKE_PREFIX_PATH="$$($(CUDA_VENV)/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)" \
	  -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc -DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) \
	  -DDOPAMINE_CUDA=ON -DDOPAMINE_BUILD_TESTS=OFF \
	  -DDOPAMINE_BUILD_BENCHMARKS=OFF -DDOPAMINE_BUILD_EXAMPLES=OFF
	cmake --build $(BUILD_DIR)/cuda -j$(JOBS)
	@echo "check-cuda-build: the CUDA kernels compile and link"
endif

format:
	clang-format -i $$(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh')

clean:
	rm -rf $(BUILD_DIR)
