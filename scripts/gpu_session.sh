#!/usr/bin/env bash
# One GPU session on an sm_90 GPU (H100, H200) in at most 8 minutes, build included; what decides most runs first:
#   1. build the extension for sm_90 only (MAX_JOBS=16)                                              budget 150 s
#   2. the static sm_90 report of both backends, in the background on the CPU (python -m benchmarks.static
#      --output $OUT/static.json): the floors the report puts beside the measured times
#   3. the cuda and triton tests of both ops (on the GPU: the first run of the Triton kernels compiled for real) 70 s
#   4. the layer benchmarks at batch 256 fp16 channels_last: eager, compile, mbkernels-cuda, mbkernels-triton  80 s
#   5. tuning: MobileNetV3-Large/-Small and EfficientNet-B0 at batch 1, 32 and 256, fp16 channels_last, each
#      choice timed on this GPU; the table beside the results (<gpu>-<date>-tuning.json), its cost per model and
#      batch in $OUT/tuning-cost.json (python -m benchmarks.tune_models)                                   80 s
#   6. the model benchmarks (quick matrix; patched+tuned reads the table step 5 wrote)         what is left - 20 s
#   7. the report, each layer's measured time beside its static floor                                     20 s
# Each step gets min(its budget, what is left); the benchmarks start no case that could end past their deadline
# (benchmarks/conftest.py) and rewrite the results file after every case, so a stopped step keeps what it measured.
#
#   bash scripts/gpu_session.sh                 logs, results, static table and report under $OUT
#   DRY_RUN=1 bash scripts/gpu_session.sh       print the plan (commands and budgets), run nothing
#
# Knobs: SESSION_BUDGET_S=480 (the whole script), RUN_BUILD=0 (a second run where the extension is already built),
# MBKERNELS_BENCH_QUICK=1 (the reduced matrix, default here), MBKERNELS_BENCH_RESUME=1 (skip what today's
# results file holds: copy the previous run's results into benchmarks/results/ first).
set -uo pipefail

cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${SESSION_BUDGET_S:-480}
DEADLINE=$((START + BUDGET))
OUT=${OUT:-build/gpu-session}
DRY_RUN=${DRY_RUN:-0}
export MBKERNELS_BENCH_QUICK=${MBKERNELS_BENCH_QUICK:-1}
# Compiled Triton/inductor kernels kept in the (ignored) build folder: a later run in this checkout reuses them.
export TORCHINDUCTOR_CACHE_DIR="$PWD/build/inductor-cache" TRITON_CACHE_DIR="$PWD/build/triton-cache"
export MBKERNELS_STATIC_CACHE="$PWD/build/static-cache"
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT" benchmarks/results
LOG="$OUT/session.log"

say() { if [ "$DRY_RUN" = 1 ]; then echo "$*"; else echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; fi; }
left() { echo $((DEADLINE - $(date +%s))); }
STATUS=0
# step NAME BUDGET_S LOGFILE COMMAND...: runs COMMAND for at most min(BUDGET_S, time left), output to LOGFILE.
step() {
  local name=$1 budget=$2 logfile=$3; shift 3
  local limit; limit=$(( budget < $(left) ? budget : $(left) ))
  if [ "$DRY_RUN" = 1 ]; then echo "step $name: budget ${budget}s: $(printf '%q ' "$@")> $logfile"; return 0; fi
  if [ "$limit" -lt 5 ]; then say "$name: skipped, the session's time is spent"; STATUS=1; return 0; fi
  say "$name (at most ${limit}s): $*"
  timeout "$limit" "$@" > "$logfile" 2>&1
  local rc=$?
  tail -n 3 "$logfile" | tee -a "$LOG"
  say "$name exit $rc (124: stopped at its time limit)"
  [ "$rc" = 0 ] || STATUS=1
}

say "gpu_session: budget ${BUDGET}s, quick=${MBKERNELS_BENCH_QUICK}, out=$OUT, dry run=$DRY_RUN"
if [ "$DRY_RUN" != 1 ]; then
  { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1
    python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1; } >> "$LOG"
fi

if [ "${RUN_BUILD:-1}" != 0 ]; then
  step build 150 "$OUT/build.log" env MBKERNELS_CUDA_ARCHS=9.0 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    python -m pip install --no-build-isolation --no-deps -e .
fi

if [ "$DRY_RUN" = 1 ]; then
  echo "background: python -m benchmarks.static --backend all --arch 9.0 --output $OUT/static.json > $OUT/static.md"
else
  python -m benchmarks.static --backend all --arch 9.0 --output "$OUT/static.json" > "$OUT/static.md" \
    2> "$OUT/static.log" &
  STATIC_PID=$!
fi

step tests 70 "$OUT/tests.log" python -m pytest -q -x -k "cuda or triton" \
  tests/test_cuda_kernels.py tests/test_dwconv_bn_act.py tests/test_squeeze_excite.py

REPORT_RESERVE=20
export MBKERNELS_BENCH_DEADLINE=$(( START + 330 < DEADLINE - REPORT_RESERVE ? START + 330 : DEADLINE - REPORT_RESERVE ))
step layers 80 "$OUT/layers.log" python -m pytest benchmarks/test_layers.py -q -rfE \
  -k "test_layer and b256-fp16-cl"
if [ "$DRY_RUN" = 1 ]; then
  export MBKERNELS_TUNING_CACHE=benchmarks/results/GPU-DATE-tuning.json
else  # beside today's results file, as the benchmarks' own default (benchmarks/conftest.py)
  export MBKERNELS_TUNING_CACHE=$(python -c 'import torch; from benchmarks import results
p = results.results_path(results.environment(torch.device("cuda"))); print(p.with_name(p.stem + "-tuning.json"))')
fi
step tune 80 "$OUT/tune.log" python -m benchmarks.tune_models --batches 1 32 256 --dtype float16 --channels-last \
  --output "$OUT/tuning-cost.json"
export MBKERNELS_BENCH_DEADLINE=$((DEADLINE - REPORT_RESERVE))
step models $(( $(left) - REPORT_RESERVE )) "$OUT/models.log" python -m pytest benchmarks/test_models.py -q -rfE \
  -k "test_model and not smoke"

if [ "$DRY_RUN" != 1 ]; then
  wait "$STATIC_PID"; say "static report exit $? ($(tail -n 1 "$OUT/static.log"))"
fi
RESULTS=$(ls -t benchmarks/results/*.json 2>/dev/null | grep -v -- '-tuning.json$' | head -n 1)
step report 20 "$OUT/report.log" python -m benchmarks.report ${RESULTS:+"$RESULTS"} --out "$OUT" --static "$OUT/static.json"
[ "$DRY_RUN" = 1 ] || cp ${RESULTS:+"$RESULTS"} "$MBKERNELS_TUNING_CACHE" "$OUT/" 2>/dev/null
say "done: exit $STATUS; files: $( [ "$DRY_RUN" = 1 ] || ls "$OUT" | tr '\n' ' ')"
exit "$STATUS"
