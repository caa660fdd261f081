#!/usr/bin/env bash
# CI on older stacks, without a GPU: the tests that depend on torch's version on every torch the package claims
# besides CI's own (Python 3.11 / torch 2.14.1 / triton 3.8):
#   2.11  the GPU machine's stack: Python 3.12, torch 2.11.0, torchvision 0.26.0, triton 3.6;
#   2.10  the floor (TORCH_FLOOR): Python 3.11, torch 2.10.0 (PyPI's build is for CUDA 12.8), torchvision 0.25.0,
#         triton 3.6.
# On each:
#  1. the version-dependent tests (VERSION_TESTS below; on the floor FLOOR_TESTS): the ops under the Triton
#     interpreter (TRITON_INTERPRET=1, set by conftest.py), torch.compile, torch.export and AOTInductor, fx capture,
#     the dataflow pass and rewrite, patch on the test models, measured plans (timing, cache);
#  2. on the GPU machine's stack only: the static sm_90 report compiled by its triton, with the gates CI applies to
#     triton 3.8's (--check).
# The CUDA extension is not built here (MBKERNELS_SKIP_CUDA_BUILD=1): .ci/run builds it against CI's torch, and
# the GPU session builds it against the GPU machine's; this script tests what these torch and Triton versions do
# with the Python package and the Triton kernels.
#
#   bash .ci/gpu_stack.sh [2.11|2.10]   (default 2.11; GPU_STACK_VENV=.gpu-stack-venv-<torch>, wheels cached in
#                                        ~/.cache/mbkernels-gpu-stack/wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
step() { echo; echo "=== $1 ($(( SECONDS - started )) s since start)"; }

STACK=${1:-2.11}
case "$STACK" in
  2.11) PYTHON_VERSION=3.12.1 TORCH=torch==2.11.0 TORCHVISION=torchvision==0.26.0 STATIC_REPORT=1 TESTS=all ;;
  2.10) PYTHON_VERSION=3.11.7 TORCH=torch==2.10.0 TORCHVISION=torchvision==0.25.0 STATIC_REPORT=0 TESTS=floor ;;
  *) echo "gpu_stack: unknown stack $STACK (2.11 or 2.10)" >&2; exit 1 ;;
esac
PYTHON="$(pyenv root)/versions/$PYTHON_VERSION/bin/python${PYTHON_VERSION%.*}"
if [ ! -x "$PYTHON" ]; then
  echo "gpu_stack: $PYTHON not found (pyenv install $PYTHON_VERSION)" >&2
  exit 1
fi
VENV=${GPU_STACK_VENV:-.gpu-stack-venv-$STACK}
# About 5 GB of wheels per stack: downloaded once, then installed from this folder.
WHEELS=${GPU_STACK_WHEELS:-$HOME/.cache/mbkernels-gpu-stack/wheels}
# setuptools: the editable install below runs without build isolation (with it, pip would fetch another 5 GB
# torch into a temporary environment); pyenv's venvs have no setuptools of their own.
# numpy < 2.4: Triton 3.6's interpreter converts runtime loop bounds with int() on 1-element arrays,
# which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.8 does not.
# The GPU itself never interprets: this pin is for the interpreter tests only.
PACKAGES=("$TORCH" "$TORCHVISION" timm efficientnet_pytorch pytest hypothesis "numpy<2.4" setuptools wheel)

# What depends on torch's (and Triton's) version; the rest of the suite (packaging, the CUDA extension's own
# tests, the CLI, third-party zoos) runs on CI's stack.
# The floor runs the ones that call torch's version-dependent APIs directly (custom ops and their registration,
# torch.compile, torch.export and AOTInductor, fx tracing, the interpreter); the GPU machine's stack runs all.
FLOOR_TESTS=(
  tests/test_dwconv_bn_act.py tests/test_squeeze_excite.py tests/test_bad_inputs.py  # the ops, interpreted
  tests/test_compile_export.py                     # torch.compile, torch.export, AOTInductor
  tests/test_dataflow.py tests/test_efficientnet_pytorch.py tests/test_model_proof.py  # fx capture, rewrite, proof
  tests/test_tuning_timing.py                      # measured plans' timing
)
VERSION_TESTS=(
  "${FLOOR_TESTS[@]}"
  tests/test_padding_slots.py tests/test_padding_orders.py tests/test_planning_inputs.py  # shapes
  tests/test_patch.py tests/test_inverted_residual.py tests/test_dilated_convs.py  # patch on the test models
  tests/test_tuning.py tests/test_tuning_cache.py  # measured plans
)

step "stack $STACK: venv $VENV with $PYTHON, $TORCH from PyPI (wheels cached in $WHEELS)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
mkdir -p "$WHEELS"
"$VENV/bin/python" -m pip download -q -d "$WHEELS" "${PACKAGES[@]}"
"$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" "${PACKAGES[@]}"
MBKERNELS_SKIP_CUDA_BUILD=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'

step "version-dependent tests on torch $STACK ($TESTS)"
tests=("${VERSION_TESTS[@]}")
if [ "$TESTS" = floor ]; then tests=("${FLOOR_TESTS[@]}"); fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"

if [ "$STATIC_REPORT" = 1 ]; then
  step "static sm_90 report with triton $("$VENV/bin/python" -c 'import triton; print(triton.__version__)')"
  mkdir -p build
  # The GPU machine compiles the kernels with this triton: the same gates as triton 3.8's in .ci/run (spills,
  # compile failures, 16-byte loads, occupancy), each failure named on stderr.
  "$VENV/bin/python" -m benchmarks.static --backend triton --arch 9.0 --check \
    --output "build/static-gpu-stack.json" > "build/static-gpu-stack.md"
fi
echo "gpu_stack: stack $STACK passed in $(( SECONDS - started )) s"
