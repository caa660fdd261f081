#!/usr/bin/env bash
# One GPU session in one device call of at most 8 minutes, build included; what decides most runs first:
#   1. build the extension for sm_90 only (MAX_JOBS=16, pip install --no-build-isolation --no-deps -e .)
#   2. the cuda and triton tests of both ops
#   3. the layer benchmarks, batch 256 float16 channels_last (the quick matrix): eager, compile, mbkernels-cuda,
#      mbkernels-triton
#   4. the model benchmarks (quick matrix)
#   5. the static sm_90 table (python -m benchmarks.static --output; its Triton half compiles on the CPU from the
#      start), then the report, which puts each measured layer time beside the static floor
# Logs, results and the report land under $OUT.
#
#   bash scripts/gpu_session.sh
#   DRY_RUN=1 bash scripts/gpu_session.sh     prints the plan (commands and budgets), runs nothing
#
# Knobs (environment): SESSION_BUDGET_S=480 (the whole script), RUN_BUILD=1 (0: a warm machine, built in place),
# RUN_TESTS=1, MBKERNELS_BENCH_RESUME=0 (1: skip (case, provider) pairs already in benchmarks/results/).
# Each step gets a budget (seconds, below); a step stops at its budget or at what is left of the session, and
# the report always keeps its reserve. Budgets are estimates for an H200 with 16 cores, not measurements yet.
set -uo pipefail

cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${SESSION_BUDGET_S:-480}
DEADLINE=$((START + BUDGET))
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-build/gpu-session}
LOG="$OUT/session.log"
REPORT_RESERVE=40  # the cuda static table and the report

export TORCHINDUCTOR_CACHE_DIR="$PWD/build/inductor-cache" TRITON_CACHE_DIR="$PWD/build/triton-cache"
export MBKERNELS_STATIC_CACHE="$PWD/build/static-cache"
export MBKERNELS_BENCH_QUICK=1

if [ "$DRY_RUN" = "1" ]; then LOG=/dev/null; else mkdir -p "$OUT" benchmarks/results; MARKER=$(mktemp); fi
say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $((DEADLINE - $(date +%s))); }

declare -A STATUS
ORDER=()
# step NAME BUDGET_S LOGFILE COMMAND...: runs COMMAND for at most min(BUDGET_S, time left - reserve) seconds.
step() {
  local name=$1 budget=$2 logfile=$3; shift 3
  ORDER+=("$name")
  if [ "$DRY_RUN" = "1" ]; then
    echo "plan: $name (budget ${budget}s, log $logfile): $*"
    STATUS[$name]=planned
    return 0
  fi
  local limit=$(( $(left) - REPORT_RESERVE ))
  [ "$name" = report ] || [ "$name" = static-cuda ] && limit=$(left)
  [ "$limit" -gt "$budget" ] && limit=$budget
  if [ "$limit" -lt 5 ]; then
    say "$name: skipped (time budget spent)"
    STATUS[$name]=skipped
    return 0
  fi
  say "$name: $* (at most ${limit}s)"
  timeout "$limit" "$@" >> "$logfile" 2>&1
  STATUS[$name]=$?
  say "$name: exit ${STATUS[$name]} (124: stopped at its time limit)"
}

say "gpu_session: budget ${BUDGET}s, out=$OUT, dry run=$DRY_RUN"
if [ "$DRY_RUN" != "1" ]; then
  { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>&1
    python -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1
  } >> "$LOG"
fi

# The Triton half of the static table needs no GPU and no build: compiled on the CPU cores beside the build and
# the tests (a cold cache takes minutes; build/static-cache keeps it for a warm machine).
STATIC_TRITON="$OUT/static-triton.json" STATIC_CUDA="$OUT/static-cuda.json"
STATIC_CMD=(python -m benchmarks.static --arch 9.0 --backend triton --output "$STATIC_TRITON")
if [ "$DRY_RUN" = "1" ]; then
  echo "plan: static-triton in the background from the start (at most $((BUDGET - 30))s, log $OUT/static-triton.log): ${STATIC_CMD[*]}"
else
  timeout $((BUDGET - 30)) "${STATIC_CMD[@]}" > "$OUT/static-triton.log" 2>&1 &
  STATIC_PID=$!
fi

if [ "${RUN_BUILD:-1}" != "0" ]; then
  step build 150 "$OUT/build.log" env MBKERNELS_CUDA_ARCHS=9.0 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    python -m pip install --no-build-isolation --no-deps -e .
fi
if [ "${RUN_TESTS:-1}" != "0" ]; then
  step tests 90 "$OUT/tests.log" python -m pytest -x -q -rs -k "cuda or triton" \
    tests/test_dwconv_bn_act.py tests/test_squeeze_excite.py tests/test_cuda_kernels.py
fi
# The benchmarks start no case that could run past their deadline (benchmarks/conftest.py); timeout is the backstop
# (the results file is rewritten after every case, so a stopped run keeps what it measured).
export MBKERNELS_BENCH_DEADLINE=$((DEADLINE - REPORT_RESERVE))
step layers 150 "$OUT/bench-layers.log" python -m pytest benchmarks/test_layers.py -q -rfE -k "test_layer["
step models 120 "$OUT/bench-models.log" python -m pytest benchmarks/test_models.py -q -rfE
step static-cuda 20 "$OUT/static-cuda.log" python -m benchmarks.static --arch 9.0 --backend cuda --output "$STATIC_CUDA"
if [ "$DRY_RUN" != "1" ]; then
  wait "$STATIC_PID"
  STATUS[static-triton]=$?
  ORDER+=(static-triton)
  say "static-triton: exit ${STATUS[static-triton]} (1: a gate failed, see static-triton.log)"
fi
step report 15 "$OUT/report.log" python -m benchmarks.report --static "$STATIC_TRITON" --static "$STATIC_CUDA" --out "$OUT"

if [ "$DRY_RUN" = "1" ]; then
  echo "plan: session budget ${BUDGET}s, report reserve ${REPORT_RESERVE}s, steps: ${ORDER[*]}"
  exit 0
fi
find benchmarks/results -maxdepth 1 -type f -newer "$MARKER" -name '*.json' -exec cp {} "$OUT/" \;
rm -f "$MARKER"
summary=""
failed=0
for name in "${ORDER[@]}"; do
  summary+="$name ${STATUS[$name]}, "
  [ "${STATUS[$name]}" = 0 ] || [ "${STATUS[$name]}" = skipped ] || failed=1
done
say "done: ${summary%, }; files: $(ls "$OUT" | tr '\n' ' ')"
exit $failed
