#!/usr/bin/env bash
# CI on the GPU machine's own stack (Python 3.12, torch 2.11.0, triton 3.6; CI's main stack is 3.11 / 2.14.1 /
# 3.8), so that the first GPU run does not die on an API difference:
#  1. a venv from pyenv's Python 3.12.1 with torch 2.11.0 + torchvision 0.26.0 from PyPI (about 5 GB; the wheels
#     are kept under ~/.cache/mbkernels-gpu-stack, so a rerun installs from there);
#  2. mbkernels from this tree with MBKERNELS_SKIP_CUDA_BUILD=1: the extension is built and tested by the main CI
#     job (.ci/run) and by scripts/gpu_session.sh on the GPU machine itself; here it would cost minutes of nvcc
#     on 2 cores for no check the Triton tests need;
#  3. the Triton and reference tests under the interpreter;
#  4. the static sm_90 report of the Triton kernels, compiled by triton 3.6, with its gates.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
step() { echo; echo "=== $1 ($(( SECONDS - started )) s since start)"; }

PYTHON312="$(pyenv root)/versions/3.12.1/bin/python3.12"
if [ ! -x "$PYTHON312" ]; then
  echo "gpu_stack: $PYTHON312 not found (pyenv install 3.12.1)" >&2
  exit 1
fi
VENV=${MBKERNELS_GPU_STACK_VENV:-.ci-gpu-stack-venv}
WHEELS="$HOME/.cache/mbkernels-gpu-stack/wheels"
# numpy < 2.4: triton 3.6's interpreter takes int() of size-1 arrays (a loop bound that is a kernel argument),
# which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); triton 3.8 does not.
PACKAGES=(torch==2.11.0 torchvision==0.26.0 timm pytest hypothesis "numpy<2.4")

step "venv: $VENV from $PYTHON312"
[ -x "$VENV/bin/python" ] || "$PYTHON312" -m venv "$VENV"
mkdir -p "$WHEELS"
"$VENV/bin/python" -m pip download -q -d "$WHEELS" "${PACKAGES[@]}"
"$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" "${PACKAGES[@]}"

step "install mbkernels (MBKERNELS_SKIP_CUDA_BUILD=1)"
MBKERNELS_SKIP_CUDA_BUILD=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

step "Triton and reference tests under the interpreter"
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -k "triton or reference" \
  tests/test_dwconv_bn_act.py tests/test_squeeze_excite.py tests/test_bad_inputs.py

step "static sm_90 report (triton $("$VENV/bin/python" -c 'import triton; print(triton.__version__)'))"
"$VENV/bin/python" -m benchmarks.static --backend triton --arch 9.0 --check > "$VENV/static-gpu-stack.md"
head -n 20 "$VENV/static-gpu-stack.md"

step "done"
