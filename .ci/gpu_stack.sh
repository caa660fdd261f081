#!/usr/bin/env bash
# CI on the GPU machine's stack, without its GPU: Python 3.12, torch 2.11.0, torchvision 0.26.0 (triton 3.6 comes
# with it), the CI machine otherwise running 3.11 / torch 2.14.1 / triton 3.8. Catches what differs between the
# two stacks before a GPU session is spent on it:
#  1. the Triton and reference tests of both ops under the interpreter (TRITON_INTERPRET=1, set by conftest.py), and
#     the planner's dataflow pass and measured plans (fx capture and rewrite, timing, cache) on torch 2.11;
#  2. the static sm_90 report compiled by triton 3.6, with the gates CI applies to triton 3.8's (--check).
# The CUDA extension is not built here (MBKERNELS_SKIP_CUDA_BUILD=1): .ci/run builds it against CI's torch, and
# the GPU session builds it against the GPU machine's; this script tests what Triton 3.6 does with our kernels.
#
#   bash .ci/gpu_stack.sh          (GPU_STACK_VENV=.gpu-stack-venv, wheels cached in ~/.cache/mbkernels-gpu-stack)
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
step() { echo; echo "=== $1 ($(( SECONDS - started )) s since start)"; }

PYTHON312="$(pyenv root)/versions/3.12.1/bin/python3.12"
if [ ! -x "$PYTHON312" ]; then
  echo "gpu_stack: $PYTHON312 not found (pyenv install 3.12.1)" >&2
  exit 1
fi
VENV=${GPU_STACK_VENV:-.gpu-stack-venv}
# About 5 GB of wheels: downloaded once, then installed from this folder.
WHEELS=${GPU_STACK_WHEELS:-$HOME/.cache/mbkernels-gpu-stack/wheels}
# setuptools: the editable install below runs without build isolation (with it, pip would fetch another 5 GB
# torch into a temporary environment); Python 3.12's venv has no setuptools of its own.
# numpy < 2.4: Triton 3.6's interpreter converts runtime loop bounds with int() on 1-element arrays, which numpy
# 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.8 does not. The GPU
# itself never interprets: this pin is for the interpreter tests only.
PACKAGES=(torch==2.11.0 torchvision==0.26.0 timm efficientnet_pytorch pytest hypothesis "numpy<2.4" setuptools wheel)

step "venv $VENV with $PYTHON312, torch 2.11.0 from PyPI (wheels cached in $WHEELS)"
[ -x "$VENV/bin/python" ] || "$PYTHON312" -m venv "$VENV"
mkdir -p "$WHEELS"
"$VENV/bin/python" -m pip download -q -d "$WHEELS" "${PACKAGES[@]}"
"$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" "${PACKAGES[@]}"
MBKERNELS_SKIP_CUDA_BUILD=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'

step "Triton and reference tests under the interpreter"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -k "triton or reference" \
  tests/test_dwconv_bn_act.py tests/test_squeeze_excite.py tests/test_bad_inputs.py

step "dataflow pass and measured plans"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_dataflow.py tests/test_efficientnet_pytorch.py \
  tests/test_tuning.py tests/test_tuning_timing.py tests/test_tuning_cache.py

step "static sm_90 report with triton $("$VENV/bin/python" -c 'import triton; print(triton.__version__)')"
mkdir -p build
# The GPU machine compiles the kernels with triton 3.6: the same gates as triton 3.8's in .ci/run (spills, compile
# failures, 16-byte loads, occupancy), each failure named on stderr.
"$VENV/bin/python" -m benchmarks.static --backend triton --arch 9.0 --check --output build/static-gpu-stack.json \
  > build/static-gpu-stack.md
echo "gpu_stack: passed in $(( SECONDS - started )) s"
