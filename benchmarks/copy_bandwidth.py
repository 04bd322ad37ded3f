"""Measured device-memory copy bandwidth (read + write bytes / time) — the roofline the kernel
benchmarks report their GB/s against. Prints one line of JSON; `--out FILE` also writes it."""
import argparse
import json
import time

import torch


def measure(device: str, mib: int = 1024, reps: int = 20) -> dict:
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up, and first-touch of dst's pages on CPU
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (%d threads)" % torch.get_num_threads()
    return {"device": name, "bytes": 2 * n * 4, "median_s": med, "copy_GBps": 2 * n * 4 / med / 1e9}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--out")
    args = ap.parse_args()
    res = measure(args.device, args.mib)
    line = json.dumps(res)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
