#!/usr/bin/env bash
# compute-sanitizer over the cuda backend's tests on a GPU: memcheck (out-of-bounds and misaligned accesses, on every
# kernel), then racecheck (shared-memory hazards), synccheck (barrier misuse) and initcheck (reads of uninitialised
# global memory) on mbkernels' own kernels. Exits non-zero when any tool reports an error or a test fails.
#
#   bash scripts/sanitize.sh                      all four tools
#   bash scripts/sanitize.sh memcheck racecheck   only these
#
# On a machine with an NVIDIA GPU and the extension built for it, e.g. on an H100/H200:
#   MBKERNELS_CUDA_ARCHS=9.0 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 \
#     && bash scripts/sanitize.sh
# compute-sanitizer comes with the full CUDA toolkit (/usr/local/cuda/bin/compute-sanitizer, a link to
# /usr/local/cuda/compute-sanitizer/compute-sanitizer); a minimal toolkit (nvcc and the headers only) has none, nor
# does a pip-only CUDA unless the `nvidia-cuda-sanitizer-api` wheel is installed. COMPUTE_SANITIZER overrides the
# search.
#
# Knobs: SANITIZE_TESTS (test files), SANITIZE_K (pytest -k; the cuda cases, small shapes: the huge-tensor and
# long-profile cases stay out), SANITIZE_KERNELS (the --kernel-name filter of racecheck and synccheck, which check
# each kernel on its own; memcheck and initcheck watch every kernel), SANITIZE_LOGS (where each tool's log goes).
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives each tensor its own allocation, so memcheck sees an access past a tensor's
# end instead of landing silently in the caching allocator's next block.
set -euo pipefail
cd "$(dirname "$0")/.."

find_sanitizer() {
  local candidate
  for candidate in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer || true)" \
      "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
      "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer" \
      /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
      /usr/local/cuda-*/bin/compute-sanitizer \
      "$(python - <<'EOF' 2>/dev/null || true
import glob, os, site
for root in site.getsitepackages():
    for path in glob.glob(os.path.join(root, "nvidia", "**", "compute-sanitizer"), recursive=True):
        if os.path.isfile(path) and os.access(path, os.X_OK):
            print(path)
            raise SystemExit
EOF
)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if ! sanitizer=$(find_sanitizer); then
  echo "sanitize.sh: compute-sanitizer not found (set COMPUTE_SANITIZER, or use a full CUDA toolkit)" >&2
  exit 2
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "sanitize.sh: no CUDA GPU here; compute-sanitizer checks kernels as they run on one" >&2
  exit 2
fi
python -c "import mbkernels, sys; s = mbkernels.backend_status()['cuda']; sys.exit(0 if s.available else s.reason)"

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(memcheck racecheck synccheck initcheck)
tests=${SANITIZE_TESTS:-"tests/test_dwconv_bn_act.py tests/test_squeeze_excite.py tests/test_cuda_kernels.py \
tests/test_fuzz.py tests/test_bad_inputs.py"}
selection=${SANITIZE_K:-"cuda and not huge and not beyond_int32 and not benchmark"}
kernels=${SANITIZE_KERNELS:-kns=mbkernels}
# shellcheck disable=SC2206
test_files=($tests)
existing=()
for file in "${test_files[@]}"; do
  if [ -f "$file" ]; then existing+=("$file"); else echo "sanitize.sh: $file is missing, skipped" >&2; fi
done
[ ${#existing[@]} -gt 0 ] || { echo "sanitize.sh: none of the test files exist" >&2; exit 2; }

export PYTORCH_NO_CUDA_MEMORY_CACHING=1 MBKERNELS_FUZZ_PROFILE=ci PYTHONUNBUFFERED=1
logs=${SANITIZE_LOGS:-sanitize-logs}
mkdir -p "$logs"
echo "sanitize.sh: $("$sanitizer" --version | tail -1) at $sanitizer; tests: ${existing[*]} -k '$selection'"

failed=()
for tool in "${tools[@]}"; do
  case "$tool" in
    memcheck) options=(--tool memcheck --leak-check no) ;;
    racecheck) options=(--tool racecheck --racecheck-report all --kernel-name "$kernels") ;;
    synccheck) options=(--tool synccheck --kernel-name "$kernels") ;;
    # Unfiltered: an uninstrumented kernel's writes (torch's randn filling x) would look uninitialised.
    initcheck) options=(--tool initcheck) ;;
    *) echo "sanitize.sh: unknown tool $tool (memcheck, racecheck, synccheck, initcheck)" >&2; exit 2 ;;
  esac
  log="$logs/$tool.log"
  started=$SECONDS
  status=0
  "$sanitizer" "${options[@]}" --error-exitcode 86 --print-limit 50 \
    python -m pytest -q -x -p no:cacheprovider -k "$selection" "${existing[@]}" > "$log" 2>&1 || status=$?
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1 || true)
  tests_line=$(grep -E "[0-9]+ (passed|failed)" "$log" | tail -1 || true)
  echo "sanitize.sh: $tool: exit $status in $(( SECONDS - started )) s;" \
    "${summary:-no summary}; ${tests_line:-no test line}"
  # Any reported error, hazard or test failure counts; so does a run that selected no test (pytest exit 5).
  if [ "$status" -ne 0 ] || grep -qE "(ERROR|RACECHECK) SUMMARY: [1-9]" "$log"; then
    grep -E "^========= (Invalid|Race|Barrier|Uninitialized|Error|Program hit)" "$log" | head -20 || true
    tail -5 "$log"
    failed+=("$tool")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "sanitize.sh: FAILED: ${failed[*]} (logs in $logs/)" >&2
  exit 1
fi
echo "sanitize.sh: clean: ${tools[*]}"
