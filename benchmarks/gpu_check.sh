#!/usr/bin/env bash
# The one script to run on the GPU machine (an H200 or H100): build, GPU tests, the benchmarks that decide
# the performance targets, compute-sanitizer, a profile of the training step, in at most 7.5 minutes with
# the build. Call it with the device tool's timeout_s=480; the run stops itself before (GPU_CHECK_BUDGET_S).
#
#   through the device tool, from the repository root (the commit: the tool sends no .git):
#       GPU_CHECK_COMMIT=<git rev-parse HEAD here> OUT=$OUT bash benchmarks/gpu_check.sh
#   a rerun on a fresh machine with the extension built by the first run (carry mim_fast/_C.*.so, unpacked
#   from its $OUT/prebuilt_C.tar.gz; never commit that file):   GPU_CHECK_PREBUILT=1 ... the same
#   the same steps on a CPU (CI runs this):   GPU_CHECK_DRY_RUN=1 OUT=dir bash benchmarks/gpu_check.sh
#
# It never stops at a failure: every step has its own time limit (and the run a budget, GPU_CHECK_BUDGET_S,
# default 450 s), records its exit code and time, and the script goes on. The steps run in the order of
# what a short lease must bring back first: correctness (the GPU tests, time-boxed: what they reached comes
# back), the target benchmarks, memcheck, the profile, then racecheck and max-autotune if time is left. A step
# stopped at its limit gets SIGINT first (pytest then still writes its junit XML, and mim-fast bench has
# written its rows after every case). After every step, and when the run itself is interrupted, the two
# result files are rewritten in $OUT, so whatever was measured comes back. It installs nothing: it uses
# the machine's python3 (PYTHON overrides) and builds mim_fast._C there. The files in $OUT (the device tool
# returns at most 8): gpu_check.tar.gz (every log, JSON, junit XML, plot) and summary.md (machine and
# versions, the results folder to use, pass/fail per test group, sanitizer verdicts, one line per
# performance target with the measured figure, the target and met / not met / missing); on a GPU also
# prebuilt_C.tar.gz (the built extension, for a rerun only). Commit the first two, unedited, under the
# folder summary.md names: benchmarks/results/<date>-h200/ or <date>-h100/.
#
# Dry run (GPU_CHECK_DRY_RUN=1): the CPU and the Triton interpreter instead of the GPU, tiny shapes, a
# small test selection, no compute-sanitizer (noted in the summary); the same steps and the same two files.
# Exit status 1 when any step failed, timed out or was skipped for want of time (after all of them ran), else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# the repository root on the path: the scripts under benchmarks/ import mim_fast even if pip's install failed
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the commit, for the machine log and every run record, where .git did not travel
[[ -n "${GPU_CHECK_COMMIT:-}" ]] && export MIM_FAST_COMMIT="$GPU_CHECK_COMMIT"
DRY="${GPU_CHECK_DRY_RUN:-0}"
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
CS="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
W="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"   # everything goes here, then into the tarball
START=$(date +%s)
printf "step\trc\tseconds\tlimit\n" > "$W/steps.tsv"

# step NAME LIMIT_S COMMAND...: run with a time limit (cut to what is left of the budget), log to
# $W/NAME.log, record the exit code (124/137: timed out) and the wall time. Never exits the script.
# COMMAND may be a function of this script: it then runs in a child bash that gets the functions and
# the variables below (timeout can only run a program).
SHARED_VARS="DRY PY W DEV TESTS BENCH_GATE BENCH_KGS BENCH_SMALL PROVIDERS PROFILE"
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
  # SIGINT at the limit (pytest writes its junit XML, Python unwinds), SIGKILL 15 s later
  if declare -F "$1" > /dev/null; then
    # shellcheck disable=SC2086
    timeout -s INT --kill-after=15 "$limit" bash -c "$(declare -p $SHARED_VARS); $(declare -f); $*" \
      > "$W/$name.log" 2>&1
  else
    timeout -s INT --kill-after=15 "$limit" "$@" > "$W/$name.log" 2>&1
  fi
  rc=$?
  printf "%s\t%s\t%s\t%s\n" "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$W/steps.tsv"
  echo "    rc=$rc in $(( $(date +%s) - t0 ))s; last lines:" | tee -a "$W/steps.log"
  tail -n 3 "$W/$name.log" | sed 's/^/    | /' | tee -a "$W/steps.log"
  write_results
}

# The result files in $OUT, rewritten after every step (each file replaced whole: a copy stopped midway
# leaves the previous one), so a run cut short still returns what it measured.
write_results() {
  "$PY" benchmarks/gpu_check_summary.py --work "$W" --out "$W/summary.md" > "$W/summary.log" 2>&1 \
    || { echo "gpu_check_summary.py failed:"; cat "$W/summary.log"; } >> "$W/summary.md"
  cp "$W/summary.md" "$OUT/.summary.md.tmp" && mv -f "$OUT/.summary.md.tmp" "$OUT/summary.md"
  tar -czf "$OUT/.gpu_check.tar.gz.tmp" -C "$W" . 2>/dev/null && mv -f "$OUT/.gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
}
# stopped from outside (the device tool's time limit, ^C): the results so far, then stop
trap 'echo "=== interrupted: writing the results so far"; write_results; exit 130' INT TERM

if [[ "$DRY" == "1" ]]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEV=cpu
  TESTS=(tests/test_philox.py tests/test_gpu_paths.py -k "not dynamic")
  BENCH_GATE=(--gate-shapes 6x3x40)
  BENCH_KGS=(--kgs-shapes 32x40,64x8)
  BENCH_SMALL=(--gate-shapes 5x4x8 --kgs-shapes 4x8 --train-batches 4)
  PROVIDERS=eager,compile,cpu
  FUSED_PROVIDERS=cpu
  PROFILE=(--batch-size 4 --steps 1 --warmup 1 --av-layers 1)
else
  DEV=cuda
  TESTS=(tests)
  BENCH_GATE=(--gate-shapes 50x2048x768)
  BENCH_KGS=(--kgs-shapes 4096x768,65536x80)
  BENCH_SMALL=(--gate-shapes 50x16x80 --kgs-shapes 16x80 --train-batches 16,256)
  PROVIDERS=eager,compile,triton,cuda,cuda-graphs
  FUSED_PROVIDERS=triton,cuda
  PROFILE=(--steps 5 --warmup 3)
fi

# --- machine and versions --------------------------------------------------------------------------------
{
  echo "dry_run $DRY"
  echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit $(git log -1 --format='%H %cI' 2>/dev/null || echo "${MIM_FAST_COMMIT:-unknown} (GPU_CHECK_COMMIT; no .git here)")"
  echo "dirty $(git status --porcelain 2>/dev/null | grep -v '^??' | wc -l) tracked files changed"
  if [[ "$DRY" != "1" ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
    kind=gpu; [[ "$gpu" == *H200* ]] && kind=h200; [[ "$gpu" == *H100* ]] && kind=h100
    echo "results_folder benchmarks/results/$(date -u +%Y-%m-%d)-$kind/"
  fi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  echo "nvcc $(command -v nvcc || echo none); CUDA_HOME ${CUDA_HOME:-unset}"
  [[ -x "$CS" ]] && echo "compute-sanitizer $CS: $("$CS" --version | tail -n 1)"
  nproc | sed 's/^/cpus /'
} > "$W/machine.log" 2>&1
cat "$W/machine.log"

# --- build -----------------------------------------------------------------------------------------------
# pip's editable install where it is allowed, else the in-place build (the machine has no network: no
# isolation, no dependencies).
build() {
  if [[ "${GPU_CHECK_PREBUILT:-0}" == "1" ]]; then  # carried from an earlier run of this commit
    "$PY" -c "import mim_fast, torch; i = mim_fast.build_info(); print(i); assert i and i['with_cuda'] and i['torch_version'] == torch.__version__"
    return
  fi
  if [[ "$DRY" == "1" ]]; then "$PY" setup.py -q build_ext --inplace; return; fi
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MIM_FAST_CUDA=1 \
    "$PY" -m pip install -e . --no-build-isolation --no-deps -q \
    || MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MIM_FAST_CUDA=1 "$PY" setup.py build_ext --inplace
}
step build 200 build
step info 30 "$PY" -m mim_fast info
if [[ "$DRY" != "1" && "${GPU_CHECK_PREBUILT:-0}" != "1" ]]; then  # for a rerun on a fresh machine only
  so=(mim_fast/_C.*.so)
  if [[ -f "${so[0]}" ]]; then
    name="$(basename "${so[0]}")"
    cp "${so[0]}" "$W/$name" && { strip --strip-debug "$W/$name" 2>/dev/null || true; } \
      && tar -czf "$OUT/prebuilt_C.tar.gz" -C "$W" "$name"
    rm -f "$W/$name"
  fi
fi

# --- GPU tests: the CUDA and compiled-Triton backends (pytest -m gpu; CI runs the CPU tests) ---------------
# Three processes over disjoint files: the Triton JIT compiles each specialization once, single-threaded.
# A test that hangs fails alone (pytest-timeout, where installed); at the step's limit every pytest gets
# SIGINT and still writes its junit XML.
run_tests() {
  local pids=() rc=0 opts=(-p no:cacheprovider -m gpu -rfE --durations=20)
  "$PY" -c "import pytest_timeout" 2> /dev/null && opts+=(--timeout=150)
  if [[ "$DRY" == "1" ]]; then
    "$PY" -m pytest "${opts[@]}" --junitxml="$W/junit_tests.xml" "${TESTS[@]}"
    return $?
  fi
  local groups=("tests/test_purify_gate.py" "tests/test_kgs_loss.py"
                "tests --ignore tests/test_purify_gate.py --ignore tests/test_kgs_loss.py")
  local i=0
  # background jobs of a non-interactive shell ignore SIGINT; with job control on they keep it, and the
  # trap forwards the step's SIGINT to them
  set -m
  for g in "${groups[@]}"; do
    # shellcheck disable=SC2086
    "$PY" -m pytest "${opts[@]}" --junitxml="$W/junit_tests_$i.xml" $g > "$W/tests_$i.log" 2>&1 &
    pids+=($!); i=$((i + 1))
  done
  trap 'kill -INT "${pids[@]}" 2> /dev/null; (sleep 10; kill -KILL "${pids[@]}" 2> /dev/null) &' INT
  for p in "${pids[@]}"; do
    while :; do
      wait "$p"; local r=$?
      if (( r > 128 )) && kill -0 "$p" 2> /dev/null; then continue; fi  # the trap interrupted wait: wait again
      (( r != 0 )) && rc=1
      break
    done
  done
  cat "$W"/tests_*.log
  return $rc
}
step tests 150 run_tests

# --- benchmarks: only what decides the targets, each provider side by side, copy bandwidth in the same run.
# The large shapes in three calls, so torch.compile builds only the graphs the summary reads; the x-frozen
# pass (a ratio, no target) after the paper-size rows.
step bench_gate 90 "$PY" -m mim_fast bench --device "$DEV" --ops gate --dtypes fp32,bf16 "${BENCH_GATE[@]}" \
  --gate-passes fwd+bwd --providers "$PROVIDERS" --out "$W/bench_large"
step bench_kgs 60 "$PY" -m mim_fast bench --device "$DEV" --ops kgs --dtypes fp32 "${BENCH_KGS[@]}" \
  --providers "$PROVIDERS" --out "$W/bench_large_kgs"
step bench_paper 100 "$PY" -m mim_fast bench --device "$DEV" --ops gate,kgs,train --dtypes fp32 "${BENCH_SMALL[@]}" \
  --gate-passes fwd+bwd --providers "$PROVIDERS" --out "$W/bench_paper"
step bench_gate_logits 40 "$PY" -m mim_fast bench --device "$DEV" --ops gate --dtypes fp32,bf16 "${BENCH_GATE[@]}" \
  --gate-passes fwd+bwd-logits --providers "$FUSED_PROVIDERS" --out "$W/bench_large_logits"

# --- compute-sanitizer memcheck over small forward+backward calls; the training-step profile; racecheck ----
# memcheck without the caching allocator: with it, an access past a small tensor's end lands inside a cached
# block and goes unseen.
if [[ "$DRY" == "1" ]]; then
  step sanitizer_cases 120 "$PY" benchmarks/sanitizer_cases.py --device cpu
  echo "compute-sanitizer: skipped (dry run on a CPU); the cases above ran without it" > "$W/sanitizer_note.log"
else
  step memcheck 100 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$CS" --tool memcheck --error-exitcode 99 \
    "$PY" benchmarks/sanitizer_cases.py
fi

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

[[ "$DRY" != "1" ]] && step racecheck 100 "$CS" --tool racecheck --error-exitcode 99 "$PY" benchmarks/sanitizer_cases.py

# --- last, time-boxed: torch.compile max-autotune at the gate target shape --------------------------------
if [[ "$DRY" == "1" ]]; then
  echo "compile-max-autotune: GPU only" > "$W/bench_max_autotune.log"
  printf "bench_max_autotune\tn/a\t0\t0\n" >> "$W/steps.tsv"
else
  step bench_max_autotune 120 "$PY" -m mim_fast bench --device cuda --ops gate --dtypes fp32,bf16 \
    --gate-shapes 50x2048x768 --gate-passes fwd+bwd --providers compile-max-autotune,triton,cuda \
    --out "$W/bench_max_autotune"
fi

# --- the result files ------------------------------------------------------------------------------------
trap - INT TERM
write_results
echo "=== done in $(( $(date +%s) - START ))s: $OUT/summary.md, $OUT/gpu_check.tar.gz"
cat "$OUT/summary.md"
# exit status: 1 when a step failed, timed out or was skipped for want of time (the summary says which)
failed=$(awk -F'\t' 'NR > 1 && $2 != "0" && $2 != "n/a"' "$W/steps.tsv" | cut -f1 | tr '\n' ' ')
rm -rf "$W"
if [[ -n "$failed" ]]; then echo "steps that failed or did not run: $failed"; exit 1; fi
