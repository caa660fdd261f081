#!/usr/bin/env bash
# One command from a fresh clone to a result:
#   bash scripts/dev.sh main [options]   set up, then patch a MobileNetV3, check it and time it (python -m mbkernels)
#   bash scripts/dev.sh test [pytest args]   set up, then run the test suite (in parallel where there is no GPU)
# Set-up (skipped when already done): a virtual environment in .venv (MBKERNELS_VENV overrides) with
# requirements.txt (main) or requirements-dev.txt (test), and mbkernels installed in editable mode. `test` builds
# the CUDA extension whenever a CUDA toolkit is found (no GPU needed: its CPU kernels are the host emulation the
# tests run); `main` builds it only where a GPU can run it, and keeps one already built. Either rebuilds only when
# csrc/, setup.py or pyproject.toml changed. Then one line says whether the extension is built and which backends
# run real kernels here.
set -euo pipefail
cd "$(dirname "$0")/.."

command=${1:-}
shift || true
case "$command" in
  main) requirements=requirements.txt ;;
  test) requirements=requirements-dev.txt ;;
  *) echo "usage: bash scripts/dev.sh main|test [args]" >&2; exit 2 ;;
esac

venv=${MBKERNELS_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "dev.sh: creating $venv" >&2
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

# The stamp names what was installed: the dev requirements include the main command's, so they serve both.
deps_stamp="$venv/.mbkernels-deps"
main_deps=main-$(sha256sum < requirements.txt | cut -d' ' -f1)
dev_deps=dev-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
installed=$(cat "$deps_stamp" 2>/dev/null || true)
deps=$([ "$command" = main ] && echo "$main_deps" || echo "$dev_deps")
if [ "$installed" != "$dev_deps" ] && [ "$installed" != "$deps" ]; then
  echo "dev.sh: installing $requirements (torch is a large download the first time)" >&2
  if ! python -m pip install -q -r "$requirements" > "$venv/deps.log" 2>&1; then
    grep -v "is ignored" "$venv/deps.log" | tail -20 >&2
    echo "dev.sh: dependency install failed (full log: $venv/deps.log)" >&2
    exit 1
  fi
  echo "$deps" > "$deps_stamp"
fi

# The CUDA toolkit's real root (a /usr/local/bin/nvcc wrapper script is not one; see setup.py).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

has_gpu() {
  command -v nvidia-smi > /dev/null && python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"
}

# The stamp names the build: "full" with the extension wherever a toolkit is found, "python" without it.
build_stamp="$venv/.mbkernels-build"
source_hash=$(cat setup.py pyproject.toml csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)
full_build=$source_hash-full-${MBKERNELS_CUDA_ARCHS:-default}
python_build=$source_hash-python
built=$(cat "$build_stamp" 2>/dev/null || true)
build=$full_build
if [ "$command" = main ]; then
  case "$built" in
    "$source_hash"-full-*) build=$built ;;  # whatever archs it was built for, the CPU runs its host emulation
    *) has_gpu || build=$python_build ;;
  esac
fi
if [ "$built" != "$build" ]; then
  log="$venv/build.log"
  skip_cuda=${MBKERNELS_SKIP_CUDA_BUILD:-0}
  if [ "$build" = "$python_build" ]; then
    echo "dev.sh: installing mbkernels without its CUDA extension (no GPU here to run it)" >&2
    rm -f mbkernels/_C*.so  # an extension built from older sources must not be the one imported
    skip_cuda=1
  else
    echo "dev.sh: building mbkernels (the CUDA extension takes a few minutes on 2 cores)" >&2
  fi
  if ! MBKERNELS_SKIP_CUDA_BUILD=$skip_cuda python -m pip install --no-build-isolation --no-deps -e . > "$log" 2>&1
  then
    grep -v "is ignored" "$log" | tail -40 >&2
    echo "dev.sh: build failed (full log: $log)" >&2
    exit 1
  fi
  grep "mbkernels setup:" "$log" >&2 || true
  echo "$build" > "$build_stamp"
fi

skipped=$([ "$build" = "$python_build" ] && echo "no GPU here to run it; 'bash scripts/dev.sh test' builds it" || true)
SKIPPED=$skipped python - >&2 <<'EOF'
import os
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # an extension that does not load is said below
    import mbkernels
    from mbkernels import _native

status = mbkernels.backend_status()
real = [name for name, state in status.items() if state.available and not state.emulated]
emulated = [name for name, state in status.items() if state.emulated]
built = (f"CUDA extension built (archs {_native.C.CUDA_ARCHS})" if _native.C is not None
         else f"CUDA extension not built ({os.environ['SKIPPED'] or _native.unavailable_reason})")
print(f"dev.sh: {built}; real kernels here: {', '.join(real)}"
      + (f" (emulated: {', '.join(emulated)})" if emulated else ""))
EOF

case "$command" in
  main) exec python -m mbkernels "$@" ;;
  test)
    # Without a GPU every test runs on one CPU thread (tests/conftest.py), so the suite runs in one pytest-xdist
    # worker per core (at most 4; MBKERNELS_TEST_WORKERS overrides, 1: none). With a GPU the tests take turns on it.
    workers=${MBKERNELS_TEST_WORKERS:-$(has_gpu && echo 1 || nproc)}
    workers=$(( workers > 4 ? 4 : workers ))
    if [ "$workers" -gt 1 ]; then exec python -m pytest -n "$workers" "$@"; fi
    exec python -m pytest "$@" ;;
esac
