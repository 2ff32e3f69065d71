#!/usr/bin/env bash
# Installs what `make` needs and is missing: a C++ toolchain, CMake,
# GoogleTest and gloo's headers (Debian packages), torch (pinned) and the Python packages the
# build, the tests and the benchmarks use (requirements.txt), and the frameworks
# the integrations serve (requirements-integrations.txt).
# Safe to run again: it installs nothing that is already there.
set -euo pipefail
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v ccache >/dev/null || missing+=(ccache)
[ -n "$(find /usr/lib* -name GTestConfig.cmake -print -quit 2>/dev/null)" ] ||
  missing+=(libgtest-dev)
# gloo's headers, for the C++ data-parallel test and example (torch's wheels
# ship the library but not them).
[ -f /usr/include/gloo/algorithm.h ] || missing+=(libgloo-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# torch is installed only where it is missing: a machine with its own torch
# (a CUDA build, say) keeps it.
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
  echo "setup: installing Python packages from requirements.txt"
  "$PYTHON" -m pip install -q -r requirements.txt
elif ! "$PYTHON" -c 'import scikit_build_core, pytest, hypothesis, numpy, matplotlib, sklearn' 2>/dev/null; then
  echo "setup: installing Python packages from requirements.txt, torch excepted"
  grep -v '^torch' requirements.txt | "$PYTHON" -m pip install -q -r /dev/stdin
fi
# The frameworks of torch_dopamine.integrations, held to the torch already
# here; their tests skip, saying why, where these are missing.
if ! "$PYTHON" -c 'import transformers, accelerate, lightning' 2>/dev/null; then
  echo "setup: installing requirements-integrations.txt"
  torch_pin="torch==$("$PYTHON" -c 'import torch; print(torch.__version__)')"
  echo "$torch_pin" | "$PYTHON" -m pip install -q -r requirements-integrations.txt -c /dev/stdin ||
    echo "setup: WARNING: requirements-integrations.txt did not install; the integration tests will skip"
fi
"$PYTHON" -c 'import torch; print("setup: torch", torch.__version__)'
