#!/usr/bin/env bash
# The one script to run on the GPU machine (an H200): build, GPU tests, compute-sanitizer, the benchmarks
# that decide the performance targets, a profile of the training step — in about 7 minutes, build included.
#
#   through the device tool, from the repository root:   OUT=$OUT bash benchmarks/gpu_check.sh
#   the same steps on a CPU (CI runs this):             GPU_CHECK_DRY_RUN=1 OUT=dir bash benchmarks/gpu_check.sh
#
# It never stops at a failure: every step has its own time limit (and the run a budget, GPU_CHECK_BUDGET_S,
# default 420 s), records its exit code and time, and the script goes on. It installs nothing: it uses the
# machine's python3 (PYTHON overrides) and builds mim_fast._C there. Exactly two files are written to $OUT
# (the device tool returns at most 8): gpu_check.tar.gz (every log, JSON, junit XML, plot) and summary.md
# (machine and versions, pass/fail per test group, sanitizer verdicts, one line per performance target with
# the measured figure, the target and met / not met). Commit both, unedited, under
# benchmarks/results/<date>-h200/.
#
# Dry run (GPU_CHECK_DRY_RUN=1): the CPU and the Triton interpreter instead of the GPU, tiny shapes, a
# small test selection, no compute-sanitizer (noted in the summary); the same steps and the same two files.
# Exit status 1 when any step failed or timed out (after all of them ran), else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
DRY="${GPU_CHECK_DRY_RUN:-0}"
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
W="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"   # everything goes here, then into the tarball
START=$(date +%s)
printf "step\trc\tseconds\tlimit\n" > "$W/steps.tsv"

# step NAME LIMIT_S COMMAND...: run with a time limit (cut to what is left of the budget), log to
# $W/NAME.log, record the exit code (124/137: timed out) and the wall time. Never exits the script.
# COMMAND may be a function of this script: it then runs in a child bash that gets the functions and
# the variables below (timeout can only run a program).
SHARED_VARS="DRY PY W DEV TESTS BENCH_BIG BENCH_SMALL PROVIDERS PROFILE"
step() {
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  (( left < limit )) && limit=$left
  if (( limit < 5 )); then
    printf "%s\tskipped\t0\t0\n" "$name" >> "$W/steps.tsv"
    echo "=== $name: skipped, the ${BUDGET}s budget is spent" | tee -a "$W/steps.log"
    return
  fi
  echo "=== $(date -u +%H:%M:%S) $name (limit ${limit}s)" | tee -a "$W/steps.log"
  local t0=$(date +%s) rc
  if declare -F "$1" > /dev/null; then
    # shellcheck disable=SC2086
    timeout --kill-after=10 "$limit" bash -c "$(declare -p $SHARED_VARS); $(declare -f); $*" > "$W/$name.log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > "$W/$name.log" 2>&1
  fi
  rc=$?
  printf "%s\t%s\t%s\t%s\n" "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$W/steps.tsv"
  echo "    rc=$rc in $(( $(date +%s) - t0 ))s; last lines:" | tee -a "$W/steps.log"
  tail -n 3 "$W/$name.log" | sed 's/^/    | /' | tee -a "$W/steps.log"
}

if [[ "$DRY" == "1" ]]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEV=cpu
  TESTS=(tests/test_philox.py tests/test_gpu_paths.py -k "not dynamic")
  BENCH_BIG=(--gate-shapes 6x3x40 --kgs-shapes 32x40,64x8)
  BENCH_SMALL=(--gate-shapes 5x4x8 --kgs-shapes 4x8 --train-batches 4)
  PROVIDERS=eager,compile,cpu
  PROFILE=(--batch-size 4 --steps 1 --warmup 1 --av-layers 1)
else
  DEV=cuda
  TESTS=(tests)
  BENCH_BIG=(--gate-shapes 50x2048x768 --kgs-shapes 4096x768,65536x80)
  BENCH_SMALL=(--gate-shapes 50x16x80 --kgs-shapes 16x80 --train-batches 16,256)
  PROVIDERS=eager,compile,triton,cuda,cuda-graphs
  PROFILE=(--steps 5 --warmup 3)
fi

# --- machine and versions --------------------------------------------------------------------------------
{
  echo "dry_run $DRY"
  echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit $(git log -1 --format='%H %cI' 2>/dev/null || echo unknown)"
  echo "dirty $(git status --porcelain 2>/dev/null | grep -v '^??' | wc -l) tracked files changed"
  if [[ "$DRY" != "1" ]]; then nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1; fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -n 1
  nproc | sed 's/^/cpus /'
} > "$W/machine.log" 2>&1
cat "$W/machine.log"

# --- build -----------------------------------------------------------------------------------------------
# pip's editable install where it is allowed, else the in-place build (the machine has no network: no
# isolation, no dependencies).
build() {
  if [[ "$DRY" == "1" ]]; then "$PY" setup.py -q build_ext --inplace; return; fi
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MIM_FAST_CUDA=1 \
    "$PY" -m pip install -e . --no-build-isolation --no-deps -q \
    || MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MIM_FAST_CUDA=1 "$PY" setup.py build_ext --inplace
}
step build 200 build
step info 30 "$PY" -m mim_fast info

# --- GPU tests: the CUDA and compiled-Triton backends (pytest -m gpu; CI runs the CPU tests) ---------------
# Three processes over disjoint files: the Triton JIT compiles each specialization once, single-threaded.
run_tests() {
  local pids=() rc=0
  if [[ "$DRY" == "1" ]]; then
    "$PY" -m pytest -p no:cacheprovider -m gpu -rfE --durations=20 --junitxml="$W/junit_tests.xml" "${TESTS[@]}"
    return $?
  fi
  local groups=("tests/test_purify_gate.py" "tests/test_kgs_loss.py"
                "tests --ignore tests/test_purify_gate.py --ignore tests/test_kgs_loss.py")
  local i=0
  for g in "${groups[@]}"; do
    # shellcheck disable=SC2086
    "$PY" -m pytest -p no:cacheprovider -m gpu -rfE --durations=20 --junitxml="$W/junit_tests_$i.xml" $g \
      > "$W/tests_$i.log" 2>&1 &
    pids+=($!); i=$((i + 1))
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  cat "$W"/tests_*.log
  return $rc
}
step tests 210 run_tests

# --- compute-sanitizer: memcheck and racecheck over small forward+backward calls -------------------------
if [[ "$DRY" == "1" ]]; then
  step sanitizer_cases 120 "$PY" benchmarks/sanitizer_cases.py --device cpu
  echo "compute-sanitizer: skipped (dry run on a CPU); the cases above ran without it" > "$W/sanitizer_note.log"
else
  step memcheck 100 compute-sanitizer --tool memcheck --error-exitcode 99 "$PY" benchmarks/sanitizer_cases.py
  step racecheck 100 compute-sanitizer --tool racecheck --error-exitcode 99 "$PY" benchmarks/sanitizer_cases.py
fi

# --- benchmarks: only what decides the targets, each provider side by side, copy bandwidth in the same run -
step bench_large 100 "$PY" -m mim_fast bench --device "$DEV" --ops gate,kgs --dtypes fp32,bf16 "${BENCH_BIG[@]}" \
  --gate-passes fwd+bwd,fwd+bwd-logits --providers "$PROVIDERS" --out "$W/bench_large"
step bench_paper 100 "$PY" -m mim_fast bench --device "$DEV" --ops gate,kgs,train --dtypes fp32 "${BENCH_SMALL[@]}" \
  --gate-passes fwd+bwd --providers "$PROVIDERS" --out "$W/bench_paper"

# --- the training step's breakdown, eager vs fused -------------------------------------------------------
profile_all() {
  local rc=0 batches=(16 256)
  [[ "$DRY" == "1" ]] && batches=(4)
  for B in "${batches[@]}"; do
    "$PY" -m mim_fast profile --device "$DEV" "${PROFILE[@]}" --batch-size "$B" --out "$W/profile_B$B" || rc=1
    rm -f "$W/profile_B$B"/trace_*.json   # Chrome traces are large: summaries and reports only
  done
  return $rc
}
step profile 60 profile_all

# --- last, time-boxed: torch.compile max-autotune at the gate target shape --------------------------------
if [[ "$DRY" == "1" ]]; then
  echo "compile-max-autotune: GPU only" > "$W/bench_max_autotune.log"
  printf "bench_max_autotune\tskipped\t0\t0\n" >> "$W/steps.tsv"
else
  step bench_max_autotune 120 "$PY" -m mim_fast bench --device cuda --ops gate --dtypes fp32,bf16 \
    --gate-shapes 50x2048x768 --gate-passes fwd+bwd --providers compile-max-autotune,triton,cuda \
    --out "$W/bench_max_autotune"
fi

# --- the two files ---------------------------------------------------------------------------------------
"$PY" benchmarks/gpu_check_summary.py --work "$W" --out "$W/summary.md" > "$W/summary.log" 2>&1 \
  || { echo "gpu_check_summary.py failed:"; cat "$W/summary.log"; } | tee -a "$W/summary.md"
cp "$W/summary.md" "$OUT/summary.md"
tar -czf "$OUT/gpu_check.tar.gz" -C "$W" .
echo "=== done in $(( $(date +%s) - START ))s: $OUT/summary.md, $OUT/gpu_check.tar.gz"
cat "$OUT/summary.md"
# exit status: 1 when a step failed or timed out (every step still ran; the summary says which)
failed=$(awk -F'\t' 'NR > 1 && $2 != "0" && $2 != "skipped"' "$W/steps.tsv" | cut -f1 | tr '\n' ' ')
rm -rf "$W"
if [[ -n "$failed" ]]; then echo "steps that failed: $failed"; exit 1; fi
