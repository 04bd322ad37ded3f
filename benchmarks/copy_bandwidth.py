"""Measured device-memory copy bandwidth (read + write bytes / time) — the roofline the kernel
benchmarks report their GB/s against (mim_fast.bench.copy_bandwidth). Prints one line of JSON;
`--out FILE` also writes it."""
import argparse
import json

import torch

from mim_fast.bench import copy_bandwidth


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--out")
    args = ap.parse_args()
    line = json.dumps(copy_bandwidth(args.device, args.mib))
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
