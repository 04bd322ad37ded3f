"""How many CPU threads `mim-fast train` should use by default: epoch times of the same runs with 1, 2, ...
threads, interleaved (1, 2, 1, 2, ...) so that a busy phase of a shared machine hits every count alike, with
the machine's 1-minute load average before each run. Each run is a fresh `mim-fast train` process.

    python benchmarks/train_threads.py [--threads 1 2] [--rounds 2] [--out DIR]

Configurations: the demo (the defaults: synthetic data, D = 40, batch 32) and the paper's width and batch
(D = 80, batch 16) on the same data. Prints a table (median seconds per epoch) and writes threads.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {"demo (D=40, batch 32)": ["--epochs", "2"],
           "paper width (D=80, batch 16)": ["--epochs", "1", "--d-model", "80", "--batch-size", "16"]}


def one_run(threads: int, args, root: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        load = os.getloadavg()[0]
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "mim_fast", "train", "--out", out, "--quiet", "--threads",
                              str(threads), *args], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": root})
        if res.returncode:
            raise SystemExit(res.stderr)
        with open(os.path.join(out, "metrics.json")) as f:
            hist = json.load(f)["history"]
    return {"threads": threads, "load1_before": round(load, 2), "wall_s": round(time.time() - t0, 2),
            "epoch_s": [round(h["seconds"], 2) for h in hist]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for name, cfg in CONFIGS.items():
        for r in range(args.rounds):
            for n in args.threads:
                row = dict(one_run(n, cfg, root), config=name, round=r)
                results.append(row)
                print(json.dumps(row), flush=True)
    lines = ["| configuration | threads | median s/epoch | runs (s/epoch) | load before each run |",
             "|---|---:|---:|---|---|"]
    for name in CONFIGS:
        for n in args.threads:
            rows = [r for r in results if r["config"] == name and r["threads"] == n]
            epochs = [e for r in rows for e in r["epoch_s"]]
            lines.append("| %s | %d | %.2f | %s | %s |" % (name, n, statistics.median(epochs),
                                                           " ".join("%.2f" % e for e in epochs),
                                                           " ".join("%.1f" % r["load1_before"] for r in rows)))
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "threads.json"), "w") as f:
        json.dump({"cpu_count": os.cpu_count(), "runs": results}, f, indent=1)
    with open(os.path.join(args.out, "threads.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
