"""How far apart runs on 1, 2 and 3 processes end up: the same `mim-fast train` (same seed, same global batch)
as one process and under `torchrun --nproc_per_node N` (gloo on the CPU), then every metric of every epoch
and every parameter of the last checkpoint compared with the 1-process run.

    python benchmarks/world_size_invariance.py [--procs 2 3] [--epochs 2] [--out DIR] [-- extra train options]

Prints a table (largest metric difference; largest parameter difference, overall and without the attention
key biases, whose exact gradient is 0 so that Adam turns their rounding noise into steps of ~lr) and writes
invariance.json, with each run's wall time.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(procs, out, args):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
                              if procs > 1 else []) + ["-m", "mim_fast", "train", "--out", out, "--quiet"] + args
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    if res.returncode:
        raise SystemExit(res.stdout + res.stderr)
    return time.time() - t0


def numbers(d, path=""):
    if isinstance(d, dict):
        for k, v in d.items():
            if k != "seconds":
                yield from numbers(v, path + "." + k)
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield path, d


def compare(a, b):
    ha, hb = (json.load(open(os.path.join(o, "metrics.json")))["history"] for o in (a, b))
    metric = max((abs(x - dict(numbers(rb))[k]), "epoch %d%s" % (ra["epoch"], k))
                 for ra, rb in zip(ha, hb) for k, x in numbers(ra))
    last = sorted(f for f in os.listdir(a) if f.startswith("checkpoint-"))[-1]
    pa, pb = (torch.load(os.path.join(o, last), weights_only=True)["model"] for o in (a, b))
    overall, rest = (0.0, ""), (0.0, "")
    for k in pa:
        d = (pa[k].double() - pb[k].double()).abs()
        overall = max(overall, (float(d.max()), k))
        if k.endswith("self_attn.in_proj_bias"):
            D = d.numel() // 3
            d = torch.cat([d[:D], d[2 * D:]])
        rest = max(rest, (float(d.max()), k))
    return {"metric": metric, "param": overall, "param_without_key_bias": rest}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("extra", nargs="*", help="more `mim-fast train` options (after --)")
    args = ap.parse_args()
    train_args = ["--epochs", str(args.epochs), "--threads", "1"] + args.extra
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "p1")
        times = {1: train(1, base, train_args)}
        rows = []
        for n in args.procs:
            out = os.path.join(tmp, "p%d" % n)
            times[n] = train(n, out, train_args)
            rows.append(dict(procs=n, **compare(base, out)))
    print("train options: %s" % " ".join(train_args))
    print("| processes | largest metric difference | largest parameter difference | without attention key biases |")
    print("|---:|---|---|---|")
    for r in rows:
        print("| %d | %.1e (%s) | %.1e (%s) | %.1e (%s) |" % (
            r["procs"], r["metric"][0], r["metric"][1], r["param"][0], r["param"][1],
            r["param_without_key_bias"][0], r["param_without_key_bias"][1]))
    print("wall seconds per run: %s" % ", ".join("%d process%s %.0f s" % (n, "es" if n > 1 else "", t)
                                                  for n, t in times.items()))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "invariance.json"), "w") as f:
            json.dump({"train_args": train_args, "rows": rows, "wall_s": times, "torch": torch.__version__}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
