"""What a fresh large CPU buffer costs: fill a new 39 MB tensor (torch.empty → fill_) vs refill one that
was already touched, single-threaded — the cost the CPU pool of recycled output buffers removes
(csrc/cpu_memory.h). Prints medians in ms.

    python benchmarks/page_fault_cost.py [--mib 39]
"""
import argparse
import time

import torch


def median_ms(fn, reps=25):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=float, default=50 * 256 * 768 * 4 / 2**20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = int(args.mib * 2**20 / 4)
    buf = torch.empty(n)
    buf.fill_(0.0)
    fresh = median_ms(lambda: torch.empty(n).fill_(1.0))
    reused = median_ms(lambda: buf.fill_(1.0))
    print("%.1f MiB float32, 1 thread: fill fresh memory %.2f ms, fill touched memory %.2f ms (%.1fx)"
          % (args.mib, fresh, reused, fresh / reused))


if __name__ == "__main__":
    main()
