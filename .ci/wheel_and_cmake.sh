#!/usr/bin/env bash
# CI: mbkernels as its users get it. Builds and repairs the wheel once (scripts/build_wheels.sh, with PYTHON's
# torch), installs that one file into a fresh venv outside the source tree for each stack (PYTHON's, then
# SECOND_PYTHON's: another torch and CPython, e.g. Python 3.12 / torch 2.11), checks that the INSTALLED
# mbkernels._C loads there, registers its ops and turns the cuda backend on, and runs the CPU tests that reach it
# against the installed package: the proof that the stable ABI's one build serves both torches and the abi3 file
# both CPythons. Then builds and installs the CMake library and builds and runs the C++ programs of tests/cpp
# against the installed copy (the ops through the dispatcher, and an AOTInductor package of a patched MobileNetV3
# made by the installed package). Prints the time of each step.
#
#   .ci/wheel_and_cmake.sh [PYTHON [SECOND_PYTHON]]
#     PYTHON: one with torch (and pytest) installed; default `python` on PATH
#     SECOND_PYTHON: default .gpu-stack-venv-2.11's (.ci/gpu_stack.sh 2.11 makes it); the step is skipped, saying so,
#     when there is none
#
# Environment: MBKERNELS_CI_PYTEST_ARGS (pytest's arguments; default below), MBKERNELS_CI_KEEP=1 (keep the scratch
# folder), CUDA_HOME (default /usr/local/cuda), MAX_JOBS.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=$(command -v "${1:-python}") || { echo "no python ${1:-python}" >&2; exit 1; }
SECOND_PY=${2:-${GPU_STACK_VENV:-$REPO/.gpu-stack-venv-2.11}/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mbkernels-ci.XXXXXX")  # outside the source tree: nothing here sees the checkout
if [[ ${MBKERNELS_CI_KEEP:-0} == 1 ]]; then
  echo "scratch folder kept: $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}  # the toolkit's root, not a wrapper script's folder (setup.py's find_cuda_home)
# nvcc, and the cmake (4.x: torch's CUDA20 dialect) and ninja that pip put beside $PY.
export PATH="$CUDA_HOME/bin:$(dirname "$PY"):$PATH"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# One architecture keeps this job within minutes on 2 cores: it checks packaging (the wheel carries a _C that
# loads and registers its ops, the CMake package links and registers them), not code generation for each GPU,
# which the main build of .ci/run covers with the full list. 7.5 is the oldest architecture supported.
export MBKERNELS_CUDA_ARCHS=7.5 TORCH_CUDA_ARCH_LIST=7.5

TIMINGS=()
step() {  # step NAME COMMAND...: runs it, records its time
  local name=$1 started=$SECONDS
  shift
  echo "=== $name"
  "$@"
  TIMINGS+=("$(printf '%-48s %4d s' "$name" $((SECONDS - started)))")
}

build_wheel() {
  WHEELHOUSE=$WORK/wheelhouse MBKERNELS_WHEEL_WORK=$WORK/wheels MBKERNELS_BUILD_PYTHON=$PY \
    "$REPO/scripts/build_wheels.sh"
  WHEELS=("$WORK"/wheelhouse/mbkernels-*+cu*-abi3-manylinux_*.whl)
  [[ -f ${WHEELS[0]} ]] || { echo "no repaired CUDA wheel in $WORK/wheelhouse" >&2; exit 1; }
  WHEEL=${WHEELS[0]}
  echo "wheel: $(basename "$WHEEL")"
}

# install_wheel BASE_PYTHON NAME: a fresh venv $WORK/venv-NAME that sees BASE_PYTHON's packages (torch, pytest,
# ...) through a .pth file, which adds their folders to sys.path after its own site-packages: the installed
# mbkernels comes first, and nothing of the checkout (not even an editable install's finder: .pth files of an
# added folder do not run) is on the path. Installing torch itself into it would add some 85 s and 5 GB and test
# nothing more. Sets VENV_PY and SITE.
install_wheel() {
  local base=$1 venv=$WORK/venv-$2
  "$base" -m venv "$venv"
  VENV_PY=$venv/bin/python
  SITE=$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$base" -c 'import sysconfig; print("\n".join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))))' \
    > "$SITE/mbkernels-ci-base.pth"
  # pip resolves the wheel's torch requirement against the torch it sees; it must not install another one.
  "$VENV_PY" -m pip install --quiet "$WHEEL" 2> >(grep -v "is ignored" >&2)
  [[ ! -d $SITE/torch ]] || { echo "pip installed a torch of its own: the requirement does not fit $base's torch" >&2; exit 1; }
}

check_installed() {
  (cd "$WORK" && "$VENV_PY" - "$SITE") <<'EOF'
import os, sys
import torch
import mbkernels
from mbkernels import _native

site = sys.argv[1]
assert mbkernels.__file__.startswith(site), f"imported {mbkernels.__file__}, not the installed package in {site}"
assert _native.C is not None, f"the installed mbkernels._C is off: {_native.unavailable_reason}"
assert _native.C.__file__.startswith(site), _native.C.__file__
print("mbkernels:", mbkernels.__file__)
print("python", sys.version.split()[0], "torch", torch.__version__)
print("mbkernels._C:", _native.C.__file__, "for torch >=", _native.C.TORCH_TARGET_VERSION, "(built with torch",
      _native.C.TORCH_VERSION + "), CUDA", _native.C.CUDA_VERSION, "archs", _native.C.CUDA_ARCHS)
for op in ("dwconv_bn_act_cuda", "squeeze_excite_cuda"):
    print("registered:", getattr(torch.ops.mbkernels, op).default._schema)
status = mbkernels.backend_status()
for name, backend in status.items():
    print(f"backend {name}: {'available' if backend.available else 'off'}: {backend.reason}")
assert status["cuda"].available, status["cuda"]
EOF
}

# The repository's tests, copied where no mbkernels sources lie, run by the venv's python: they import the
# installed package (test_packaging checks that the loaded _C is the wheel's). Default subset: the packaging
# tests and the native kernels' tests, which run the installed kernels' host emulation on CPU tensors; the
# other suites test Python code that is the same in the checkout, and .ci/run runs them there.
run_tests() {  # run_tests NAME: in $WORK/pytest-NAME
  local dir=$WORK/pytest-$1
  mkdir -p "$dir"
  cp -r "$REPO/tests" "$dir/tests"
  cp "$REPO/pyproject.toml" "$dir/"  # pytest's settings (markers)
  local args=${MBKERNELS_CI_PYTEST_ARGS:-"-m 'not gpu and not slow' tests/test_packaging.py tests/test_cuda_kernels.py tests/test_signatures.py"}
  (cd "$dir" && eval "\"\$VENV_PY\" -m pytest -q -p no:cacheprovider -rfEs $args")
}

cmake_library() {
  local torch_cmake
  torch_cmake=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  cmake -S "$REPO" -B "$WORK/cmake-build" -G Ninja -DCMAKE_PREFIX_PATH="$torch_cmake" \
    -DCMAKE_INSTALL_PREFIX="$WORK/cmake-install" > "$WORK/cmake-configure.log" 2>&1 \
    || { cat "$WORK/cmake-configure.log"; exit 1; }
  cmake --build "$WORK/cmake-build" --parallel "$MAX_JOBS"
  cmake --install "$WORK/cmake-build"
}

cmake_consumer() {
  local torch_cmake
  torch_cmake=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  cmake -S "$REPO/tests/cpp" -B "$WORK/cpp-build" -G Ninja -DCMAKE_PREFIX_PATH="$WORK/cmake-install;$torch_cmake" \
    > "$WORK/cpp-configure.log" 2>&1 || { cat "$WORK/cpp-configure.log"; exit 1; }
  cmake --build "$WORK/cpp-build"
  # The program calls no symbol of the library: only the no-as-needed link keeps it, and with it the ops.
  readelf -d "$WORK/cpp-build/check_ops" | grep -q 'NEEDED.*libmbkernels' \
    || { echo "check_ops does not link libmbkernels: the linker dropped it" >&2; exit 1; }
  "$WORK/cpp-build/check_ops"
  # An AOTInductor package of a patched MobileNetV3, made by the installed package (from the copy of tests/ that
  # run_tests made, where no mbkernels sources lie), run by a C++ program: its mbkernels ops are libmbkernels'.
  (cd "$WORK" && "$WORK/venv-first/bin/python" "$WORK/pytest-first/tests/cpp/make_package.py" "$WORK/package")
  readelf -d "$WORK/cpp-build/run_package" | grep -q 'NEEDED.*libmbkernels' \
    || { echo "run_package does not link libmbkernels: the linker dropped it" >&2; exit 1; }
  "$WORK/cpp-build/run_package" "$WORK/package/patched.pt2" "$WORK/package/tensors.bin"
}

# The same wheel file on another stack: installed, loaded, tested as on the first.
second_stack() {
  "$SECOND_PY" -c 'import sys, torch; print("second stack: python", sys.version.split()[0], "torch", torch.__version__)'
  install_wheel "$SECOND_PY" second
  check_installed
  run_tests second
}

started=$SECONDS
step "wheel: build and repair once (arch 7.5)" build_wheel
step "wheel: install into a fresh venv" install_wheel "$PY" first
step "wheel: the installed _C loads, ops registered" check_installed
step "wheel: CPU tests against the installed package" run_tests first
if [[ -x $SECOND_PY ]]; then
  step "wheel: the same file on a second stack (load, tests)" second_stack
else
  echo "=== wheel: second stack skipped: no python at $SECOND_PY (bash .ci/gpu_stack.sh makes one)"
fi
step "cmake: build and install the library" cmake_library
step "cmake: build and run tests/cpp (ops, AOTI package)" cmake_consumer
echo "=== timings"
printf '%s\n' "${TIMINGS[@]}"
printf '%-48s %4d s\n' "total" $((SECONDS - started))
echo "wheel: $(basename "$WHEEL")"
