#!/usr/bin/env bash
# The GPU check: run from the project root on a machine with an NVIDIA GPU,
# nvcc and a CUDA build of torch, no network and no package manager.
#   OUT=/some/folder bash scripts/gpu_check.sh
# It prints the GPU and versions, builds against that torch with the CUDA
# kernels (GoogleTest from $GTEST_SOURCE_DIR, default .device/googletest,
# when none is installed), runs the C++ and Python suites (CUDA cases
# included), runs the CUDA cases under compute-sanitizer (memcheck and
# racecheck), checks that CPU and CUDA draw the same noise, and runs the op
# and scaling benchmarks on CUDA; with two GPUs, Dopamine over NCCL
# (tests/python/ranks_check.py). The sanitizers run last, each bounded by
# SANITIZER_TIMEOUT (120 s); give the whole check about 16 minutes, or set
# SANITIZER=off for about 8. Logs and results go under $OUT (default
# build/gpu_check); summary.txt says what passed. On a machine without a
# CUDA device it prints the versions, says so and skips the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-build/gpu_check}
BUILD=${BUILD:-build/gpu}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/summary.txt"
failed=0

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }
run() { # run NAME COMMAND...: its output goes to $OUT/NAME.log
  local name=$1
  shift
  log "start $name"
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc = 0 ]; then
    log "pass  $name"
  else
    # timeout(1) exits 124: the step ran out of time, it found no error.
    log "FAIL  $name (exit $rc$([ $rc = 124 ] && echo ", out of time")); last lines of $OUT/$name.log:)"
    tail -n 25 "$OUT/$name.log" | tee -a "$OUT/summary.txt"
    failed=1
  fi
}

{
  echo "== nvidia-smi"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi: not found"
  echo "== nvcc"
  nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not found"
  echo "== cmake"
  cmake --version | head -n 1
  echo "== torch"
  "$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
} 2>&1 | tee "$OUT/versions.txt"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  log "no CUDA device: skipped the CUDA build, the suites on CUDA, the noise check, the CUDA benchmarks and the sanitizers"
  exit 0
fi

TORCH_PREFIX=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
# The toolkit's root: $CUDA_HOME, else /usr/local/cuda, else above nvcc.
if [ -n "${CUDA_HOME:-}" ]; then
  CUDA_ROOT=$CUDA_HOME
elif [ -x /usr/local/cuda/bin/nvcc ]; then
  CUDA_ROOT=/usr/local/cuda
else
  CUDA_ROOT=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
fi
NVCC=$CUDA_ROOT/bin/nvcc
cmake_args=(-S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX"
  -DDOPAMINE_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT"
  -DPython3_EXECUTABLE="$(command -v "$PYTHON")")
command -v ninja >/dev/null && cmake_args+=(-G Ninja)
if [ -z "$(find /usr/lib* /usr/local/lib* -name GTestConfig.cmake -print -quit 2>/dev/null)" ]; then
  GTEST_SOURCE_DIR=${GTEST_SOURCE_DIR:-.device/googletest}
  if [ -f "$GTEST_SOURCE_DIR/CMakeLists.txt" ]; then
    cmake_args+=(-DDOPAMINE_GTEST_SOURCE_DIR="$(cd "$GTEST_SOURCE_DIR" && pwd)")
  else
    log "no GoogleTest installed and no sources in $GTEST_SOURCE_DIR: C++ tests off"
    cmake_args+=(-DDOPAMINE_BUILD_TESTS=OFF)
  fi
fi

run configure cmake "${cmake_args[@]}"
run build cmake --build "$BUILD" -j "$JOBS"
if [ -f "$BUILD/CTestTestfile.cmake" ]; then
  run cpp-tests ctest --test-dir "$BUILD" --output-on-failure -j 4
fi
if "$PYTHON" -c 'import scikit_build_core' 2>/dev/null; then
  run python-install env CMAKE_ARGS="-DDOPAMINE_CUDA=ON -DCMAKE_CUDA_COMPILER=$NVCC -DCUDA_TOOLKIT_ROOT_DIR=$CUDA_ROOT" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v .
else
  # No scikit-build-core and no network to get it: the package from the
  # source tree over the library just built.
  log "no scikit-build-core: using python/ with $BUILD's library"
  export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
  export TORCH_DOPAMINE_LIBRARY=$PWD/$BUILD/libdopamine.so
fi
run python-tests env DOPAMINE_BUILD_DIR="$BUILD" "$PYTHON" -m pytest -q -rs tests/python
run noise-equality "$PYTHON" -m pytest -v tests/python/test_noise.py
# Data and population parallel over NCCL, one rank per GPU.
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then
  run nccl-ranks "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 tests/python/ranks_check.py
  cat "$OUT/nccl-ranks.log" >>"$OUT/summary.txt" 2>/dev/null
else
  log "one GPU: the 2-rank NCCL check (tests/python/ranks_check.py) needs two; skipped"
fi
# Scaling from 1e6: each point is a fresh process, and the smaller ones say
# little on a GPU; this keeps the check before the sanitizers within 8 minutes.
run bench-cuda "$PYTHON" benchmarks/python/run_suite.py --device cuda --skip xor lorenz rossler digits \
  --scaling-sizes 1000000 10000000 100000000 --out "$OUT/bench"
# NVIDIA's compute-sanitizer over the CUDA cases: memcheck (out-of-bounds and
# misaligned accesses, with torch's caching allocator off so that a read past
# a tensor is not hidden inside a pooled block) and racecheck (the launch's
# shared-memory phases, docs/DESIGN.md "CUDA emulation"). Each run is bounded
# by SANITIZER_TIMEOUT seconds; the tools slow kernels about 100x.
# SANITIZER=off skips them.
SANITIZER=${SANITIZER:-$CUDA_ROOT/bin/compute-sanitizer}
[ "$SANITIZER" = off ] || [ -x "$SANITIZER" ] || SANITIZER=$(command -v compute-sanitizer || true)
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-120}
if [ "$SANITIZER" = off ]; then
  log "SANITIZER=off: memcheck and racecheck skipped"
elif [ -n "$SANITIZER" ]; then
  "$SANITIZER" --version 2>&1 | tail -n 1 >>"$OUT/versions.txt"
  for tool in memcheck racecheck; do
    sanitize=(timeout "$SANITIZER_TIMEOUT" "$SANITIZER" --tool "$tool" --error-exitcode 1
      --print-limit 20)
    if [ -x "$BUILD/tests/cpp/dopamine_tests" ]; then
      run "sanitize-$tool-cpp" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "${sanitize[@]}" "$BUILD/tests/cpp/dopamine_tests" --gtest_filter='Cuda.*'
    fi
    run "sanitize-$tool-python" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 DOPAMINE_BUILD_DIR="$BUILD" \
      "${sanitize[@]}" "$PYTHON" -m pytest -q -x -k cuda tests/python/test_noise.py tests/python/test_engine.py \
        tests/python/test_update_rule.py
  done
else
  log "no compute-sanitizer in $CUDA_ROOT/bin or on PATH: memcheck and racecheck skipped"
fi
cat "$OUT/noise-equality.log" >>"$OUT/summary.txt" 2>/dev/null
grep -A 14 "^## Ops" "$OUT/bench/REPORT.md" >>"$OUT/summary.txt" 2>/dev/null
log "done: $([ $failed = 0 ] && echo all passed || echo some steps FAILED)"
exit $failed
