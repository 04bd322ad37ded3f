#!/usr/bin/env bash
# The README's Quickstart times, measured: a fresh clone of this repository, then
#   1. make's setup: .venv, torch 2.14.1 + triton + test tools, the package installed editable;
#   2. the extension without CUDA (MIM_FAST_CUDA=0: the CPU kernels only; what a machine without nvcc builds);
#   3. the extension with CUDA (what `make build` compiles when nvcc is present; the CPU build removed first);
#   4. `make demo`'s training run (extension already built).
# Each step's wall time and the 1-minute load average before it go to stdout.
#     bash benchmarks/fresh_clone_times.sh [CLONE_DIR]
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$(mktemp -d)/mim_fast}"
git clone -q "$src" "$dir"
cd "$dir"
step() {  # step NAME COMMAND...
    local name="$1"; shift
    local load; load=$(cut -d' ' -f1 /proc/loadavg)
    local t0; t0=$(date +%s.%N)
    "$@" > "$dir/$name.log" 2>&1
    printf '%-28s %7.1f s   (load before: %s)\n' "$name" "$(echo "$(date +%s.%N) - $t0" | bc)" "$load"
}
echo "fresh clone of $(git -C "$src" rev-parse --short HEAD) in $dir; $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
step setup make .venv/.install-stamp
step build-cpu-only env MIM_FAST_CUDA=0 .venv/bin/python setup.py -q build_ext --inplace
rm -rf build mim_fast/_C*.so
step build-with-cuda make build
step demo-train make demo
tail -n 3 "$dir/demo-train.log"
