#!/usr/bin/env bash
# One command from a fresh clone to a result:
#   bash scripts/dev.sh main [options]   set up, then patch a MobileNetV3, check it and time it (python -m mbkernels)
#   bash scripts/dev.sh test [pytest args]   set up, then run the test suite
# Set-up (skipped when already done): a virtual environment in .venv (MBKERNELS_VENV overrides) with
# requirements-dev.txt, and mbkernels installed in editable mode with its CUDA extension built when a CUDA toolkit
# is found (rebuilt only when csrc/ or setup.py changed). No GPU is needed for any of it.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${MBKERNELS_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "dev.sh: creating $venv" >&2
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

deps_stamp="$venv/.mbkernels-deps"
deps_hash=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ "$(cat "$deps_stamp" 2>/dev/null)" != "$deps_hash" ]; then
  echo "dev.sh: installing requirements-dev.txt (torch is a large download the first time)" >&2
  if ! python -m pip install -q -r requirements-dev.txt > "$venv/deps.log" 2>&1; then
    grep -v "is ignored" "$venv/deps.log" | tail -20 >&2
    echo "dev.sh: dependency install failed (full log: $venv/deps.log)" >&2
    exit 1
  fi
  echo "$deps_hash" > "$deps_stamp"
fi

# The CUDA toolkit's real root (a /usr/local/bin/nvcc wrapper script is not one; see setup.py).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

build_stamp="$venv/.mbkernels-build"
build_hash=$(cat setup.py pyproject.toml csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)-${MBKERNELS_CUDA_ARCHS:-default}
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$build_hash" ]; then
  echo "dev.sh: building mbkernels (the CUDA extension takes a few minutes on 2 cores)" >&2
  log="$venv/build.log"
  if ! python -m pip install --no-build-isolation --no-deps -e . > "$log" 2>&1; then
    grep -v "is ignored" "$log" | tail -40 >&2
    echo "dev.sh: build failed (full log: $log)" >&2
    exit 1
  fi
  grep "mbkernels setup:" "$log" >&2 || true
  echo "$build_hash" > "$build_stamp"
fi

command=${1:-}
shift || true
case "$command" in
  main) exec python -m mbkernels "$@" ;;
  test) exec python -m pytest "$@" ;;
  *) echo "usage: bash scripts/dev.sh main|test [args]" >&2; exit 2 ;;
esac
