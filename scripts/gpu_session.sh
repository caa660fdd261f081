#!/usr/bin/env bash
# One GPU session in one device call (at most 10 minutes): build the extension, run the test suite, run the
# benchmarks, write the report; logs, results and report land under $OUT (8 files at most come back).
#
#   bash scripts/gpu_session.sh [extra pytest arguments for benchmarks/, e.g. -k model]
#
# Knobs (environment):
#   SESSION_BUDGET_S=570         wall-clock seconds for the whole script (the device call's limit is 600)
#   RUN_BUILD=1                  0 skips the build (a follow-up call on a machine still warm: built in place)
#   RUN_TESTS=1                  0 skips the test suite (a follow-up call)
#   TESTS_BUDGET_S=200           the test suite is stopped after this long
#   MBKERNELS_BENCH_QUICK=1      the reduced matrix (default here); 0 for the full one
#   MBKERNELS_BENCH_RESUME=0     1 skips (case, provider) pairs already in benchmarks/results/<gpu>-<date>.json:
#                                copy the previous call's results file there first, then call again
#   MBKERNELS_BENCH_COMPILE_MODE forces the torch.compile mode of the compile providers ("default" for none)
#
# Runtime estimate (H100, 16 cores). Estimated, not measured yet: the first GPU run tells (every record keeps
# setup_s, the seconds its provider took to build and compile).
#   build ~2 min; test suite ~2 min (stopped at TESTS_BUDGET_S); report ~15 s.
#   Quick matrix, 160 cases, in the order they run:
#     102 layer cases needing no compilation (eager, mbkernels-cuda, mbkernels-triton; all 34 layer shapes at
#         batch 256 fp16 channels_last)                                                 ~1.5 min
#      15 model cases needing no compilation (eager, patched at batch 256 and 1; patched-cudagraph at 1)  ~1 min
#      34 layer compiles (default mode in the quick matrix)                            ~1.5-2 min
#       9 model compiles (compile and patched+compile at batch 256, compile reduce-overhead at batch 1;
#         default mode), 30-60 s each                                                   ~5-9 min
#   One call therefore measures every comparison except most model compiles: no case starts that could
#   run past the deadline, and the report runs on what was measured. To finish, copy the returned results
#   JSON into benchmarks/results/ and call again with RUN_TESTS=0 MBKERNELS_BENCH_RESUME=1, until bench.log
#   shows no case skipped for "time budget spent" (one more call is likely enough).
#   Full matrix (MBKERNELS_BENCH_QUICK=0), 900 cases: 612 uncompiled layer cases ~10 min, 204 layer compiles
#   in max-autotune-no-cudagraphs ~8 s each ~27 min, 42 uncompiled model cases ~2 min, 42 model compiles
#   (max-autotune for the 6 at batch 256 fp16 channels_last, ~3 min each; default for the rest) ~40 min:
#   about 80 min, several sessions, resumable the same way.
set -uo pipefail

cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${SESSION_BUDGET_S:-570}
DEADLINE=$((START + BUDGET))
OUT=${OUT:-build/gpu-session}
mkdir -p "$OUT" benchmarks/results
LOG="$OUT/session.log"
MARKER=$(mktemp)  # results written after this are this session's

# Compiled Triton/inductor kernels kept in the (ignored) build folder: a later call on a still-warm machine
# reuses them instead of compiling again.
export TORCHINDUCTOR_CACHE_DIR="$PWD/build/inductor-cache" TRITON_CACHE_DIR="$PWD/build/triton-cache"
export MBKERNELS_BENCH_QUICK=${MBKERNELS_BENCH_QUICK:-1}

say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $((DEADLINE - $(date +%s))); }
at_least_1() { if [ "$1" -gt 1 ]; then echo "$1"; else echo 1; fi; }

say "gpu_session: budget ${BUDGET}s, quick=${MBKERNELS_BENCH_QUICK}, out=$OUT"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>&1
  python -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' 2>&1
} >> "$LOG"

BUILD=skipped
if [ "${RUN_BUILD:-1}" != "0" ]; then
  say "build: pip install --no-build-isolation --no-deps -e ."
  MBKERNELS_CUDA_ARCHS=9.0 MAX_JOBS=16 python -m pip install --no-build-isolation --no-deps -e . >> "$LOG" 2>&1
  BUILD=$?
  say "build exit $BUILD"
fi
python -c 'import mbkernels; [print(f"  {k}: {v}") for k, v in mbkernels.backends().items()]' 2>&1 | tee -a "$LOG"

TESTS=skipped
if [ "${RUN_TESTS:-1}" != "0" ]; then
  say "tests: pytest tests/ -x -q (at most ${TESTS_BUDGET_S:-200}s)"
  timeout "$(at_least_1 "${TESTS_BUDGET_S:-200}")" python -m pytest tests/ -x -q > "$OUT/tests.log" 2>&1
  TESTS=$?
  tail -n 3 "$OUT/tests.log" | tee -a "$LOG"
  say "tests exit $TESTS (124: stopped at the time limit)"
fi

# The benchmarks start no case that could run into the report's reserve (per-kind allowances in
# benchmarks/conftest.py); timeout is the backstop (the results file is rewritten after every case, so a
# stopped run keeps what it measured).
REPORT_RESERVE=30
export MBKERNELS_BENCH_DEADLINE=$((DEADLINE - REPORT_RESERVE))
say "benchmarks: pytest benchmarks/ (deadline in $(( $(left) - REPORT_RESERVE ))s)"
timeout "$(at_least_1 $(( $(left) - REPORT_RESERVE + 20 )))" python -m pytest benchmarks/ -q -rfE \
  --benchmark-columns=min,median,iqr,rounds,iterations --benchmark-sort=name "$@" > "$OUT/bench.log" 2>&1
BENCH=$?
grep -E "^(FAILED|ERROR)|passed|failed|mbkernels benchmark results" "$OUT/bench.log" | tail -n 20 | tee -a "$LOG"
say "benchmarks exit $BENCH"

say "report: python -m benchmarks.report"
python -m benchmarks.report >> "$LOG" 2>&1
REPORT=$?
say "report exit $REPORT"

find benchmarks/results -maxdepth 1 -type f -newer "$MARKER" \( -name '*.json' -o -name '*.md' -o -name '*.png' \) \
  -exec cp {} "$OUT/" \;
rm -f "$MARKER"
say "done: build $BUILD, tests $TESTS, benchmarks $BENCH, report $REPORT; files: $(ls "$OUT" | tr '\n' ' ')"
ok() { [ "$1" = 0 ] || [ "$1" = skipped ]; }
ok "$BUILD" && ok "$TESTS" && [ "$BENCH" = 0 ] && [ "$REPORT" = 0 ]
