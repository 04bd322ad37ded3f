"""Per-step time of MIM's training step, eager vs ``mim-fast train --compile`` (mim_fast.train.compile_model:
the Transformer encoders compiled), measured interleaved in one process — one eager step, one compiled
step, and again — so that a busy phase of a shared machine hits both alike.

    python benchmarks/train_compile.py [--steps 40] [--warmup 10] [--threads 1] [--device cpu|cuda] [--out DIR]

Configurations: the paper's dims (D = 80, T = 50, 3 audio/vision layers, inputs 768/74/47) at batch 16
and the demo's (D = 40, T = 20, 1 layer, inputs 32/16/16) at batch 32. The first compiled step (which
compiles) is reported separately. Prints a table and writes compile.json (with the load average).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mim_fast import train as T  # noqa: E402
from mim_fast.profile import _config  # noqa: E402

CONFIGS = {
    "paper dims (D=80, T=50, 3 layers), batch 16": dict(batch_size=16, d_model=80, seq_len=50, heads=5, av_layers=3,
                                                         dims=(768, 74, 47)),
    "demo dims (D=40, T=20, 1 layer), batch 32": dict(batch_size=32, d_model=40, seq_len=20, heads=5, av_layers=1,
                                                       dims=(32, 16, 16)),
}


def measure(name, shape, steps, warmup, device):
    cfg = _config("auto", device, amp="none", seed=0, **shape)
    data = T.load_for_training(cfg)
    batch = next(T.batches(data.train, cfg.batch_size, shuffle=False, device=device))
    runs = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = T.build_model(data, cfg).to(device)
        if mode == "compiled":
            T.compile_model(model)
        runs[mode] = (model, T.Optimizers(model, cfg, device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {m: [] for m in runs}
    loads = []
    for i in range(steps + warmup):
        loads.append(os.getloadavg()[0])
        for mode, (model, opt) in runs.items():
            sync()
            t0 = time.perf_counter()
            T.train_step(model, opt, batch, cfg, 100 + i, device)
            sync()
            times[mode].append(time.perf_counter() - t0)
    row = {"config": name, "first_compiled_step_s": round(times["compiled"][0], 1), "load1": [min(loads), max(loads)]}
    for mode, ts in times.items():
        ts = sorted(ts[warmup:])
        row[mode] = {"median_ms": round(1e3 * statistics.median(ts), 1), "p20_ms": round(1e3 * ts[len(ts) // 5], 1),
                     "p80_ms": round(1e3 * ts[(4 * len(ts)) // 5], 1)}
    row["speedup"] = round(row["eager"]["median_ms"] / row["compiled"]["median_ms"], 2)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(name, shape, args.steps, args.warmup, torch.device(args.device)) for name, shape in CONFIGS.items()]
    print("| configuration | eager ms/step (p20-p80) | compiled ms/step (p20-p80) | eager/compiled "
          "| first compiled step | load |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print("| %s | %.1f (%.1f-%.1f) | %.1f (%.1f-%.1f) | %.2f× | %.1f s | %.1f-%.1f |" % (
            r["config"], r["eager"]["median_ms"], r["eager"]["p20_ms"], r["eager"]["p80_ms"],
            r["compiled"]["median_ms"], r["compiled"]["p20_ms"], r["compiled"]["p80_ms"], r["speedup"],
            r["first_compiled_step_s"], r["load1"][0], r["load1"][1]))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compile.json"), "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "device": args.device,
                       "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else
                       T.runs.cpu_name(),
                       "steps": args.steps, "warmup": args.warmup, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
