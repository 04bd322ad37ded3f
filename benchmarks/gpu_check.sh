#!/usr/bin/env bash
# The one script to run on the GPU machine (an H100): build, GPU tests, benchmarks — in under 8 minutes.
#
#   run it through the device tool from the repository root:  bash benchmarks/gpu_check.sh
#
# It uses the machine's preinstalled python3/torch/triton (installs nothing), builds mim_fast._C there,
# and writes every log and JSON under $OUT (default: ./gpu_check_out). It stops at the first broken step
# (set -e) so a failure is loud; each step's log is in $OUT. Commit the results, unedited, under
# benchmarks/results/<date>-<gpu>/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
step() { echo "=== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/steps.log"; }

step "machine"
{ nvidia-smi || true; "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; "$PY" -c "import triton; print('triton', triton.__version__)"; git log -1 --format='commit %H %cI' || true; } 2>&1 | tee "$OUT/machine.log"

step "build (MAX_JOBS=16, TORCH_CUDA_ARCH_LIST=9.0)"
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MIM_FAST_CUDA=1 \
  "$PY" -m pip install -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
"$PY" -m mim_fast info 2>&1 | tee "$OUT/info.log"

step "GPU tests (CUDA and compiled-Triton backends vs the reference, opcheck, compile fullgraph, CUDA graphs)"
# tests/test_bench.py only times toy CPU runs of the bench runner: left to CI.
"$PY" -m pytest -q -x tests -p no:cacheprovider --deselect tests/test_bench.py 2>&1 | tee "$OUT/tests.log"

step "mim-fast bench --quick (copy bandwidth; gate, KGS, training step; fp32 and bf16)"
"$PY" -m mim_fast bench --quick --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"

step "profile of the training step, eager vs fused (B=16 and B=256; traces not kept: summaries and reports)"
for B in 16 256; do
  "$PY" -m mim_fast profile --device cuda --batch-size $B --steps 5 --warmup 3 --out "$OUT/profile_B$B" \
    2>&1 | tee "$OUT/profile_B$B.log"
  rm -f "$OUT/profile_B$B"/trace_*.json
done

step "torch.compile max-autotune at the H100 target shapes (last: a slow autotune only costs this step)"
timeout 240 "$PY" -m mim_fast bench --ops gate,kgs --dtypes fp32 --gate-shapes 50x2048x768 --kgs-shapes 4096x768,65536x80 \
  --providers eager,compile,compile-max-autotune,triton,cuda --out "$OUT/bench_max_autotune" 2>&1 \
  | tee "$OUT/bench_max_autotune.log" || echo "max-autotune step failed or timed out (see its log)" | tee -a "$OUT/steps.log"
step "done"
