"""Per-call cost of the fused ops at the paper's size, split into its layers (µs per call, CPU).

At MIM's size (gate T=50 B=16 D=80, KGS M=3 B=16 D=80) the arithmetic is a few µs; the rest of a call is
the host path: argument checks, backend dispatch, the custom op's dispatcher and autograd glue. This
times each layer on its own, interleaved round-robin (so the machine's drift hits all alike), medians:

  kernel          torch.ops.mim_fast.*_forward (+ *_backward) called directly: the C++ op alone
  op fwd          mim_fast.purify_gate / kgs_loss under no_grad: + checks and dispatch
  op fwd+bwd      the public op forward and backward, as a training step calls it
  eager fwd+bwd   the eager reference (the published formulation; for dropout torch's F.dropout), for the ratio
  checked path fwd+bwd  (dropout) the public call with its common-call fast path off: the argument checks
                  and the Python op mim_fast::dropout that every other call takes
  autograd floor  (gate) two scalar ops and torch.autograd.backward of their two outputs, as the gate's
                  step calls it: what any forward+backward pays for the autograd engine here

    python benchmarks/op_overhead.py [--threads 1] [--reps 2000] [--out FILE.json]
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

import mim_fast
from mim_fast import reference


def _gate_calls(T=50, B=16, D=80):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, D, generator=gen)
    logits = torch.randn(B, T, generator=gen) - 3
    G = torch.randn(B, D, generator=gen)
    one = torch.ones(())
    xg, lg = x.clone().requires_grad_(), logits.clone().requires_grad_()
    pen_shift = (1 / 3) * math.log(0.2)
    fwd, bwd = torch.ops.mim_fast.purify_gate_forward, torch.ops.mim_fast.purify_gate_backward

    def kernel():
        out = fwd(x, logits, None, None, 7, 0, "sample", "tanh", 3.0, 1 / 3, 1.2, -0.2, 0.6, pen_shift)
        bwd(G, one, x, out[2], out[3], out[4], out[5], None, "tanh")

    def op_fwd():
        with torch.no_grad():
            mim_fast.purify_gate(x, logits, seed=7)

    def op_fwd_bwd():
        xg.grad = lg.grad = None
        out = mim_fast.purify_gate(xg, lg, seed=7)
        torch.autograd.backward([out.pooled, out.penalty], [G, one])

    def eager_fwd_bwd():
        xg.grad = lg.grad = None
        out = reference.purify_gate(xg, lg, seed=7, exact_math=False)
        torch.autograd.backward([out.pooled, out.penalty], [G, one])

    a, b = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)

    def autograd_floor():
        a.grad = b.grad = None
        torch.autograd.backward([a * b, a + b], [one, one])

    return {"kernel": kernel, "op fwd": op_fwd, "op fwd+bwd": op_fwd_bwd, "eager fwd+bwd": eager_fwd_bwd,
            "autograd floor": autograd_floor}


def _kgs_calls(M=3, B=16, D=80):
    gen = torch.Generator().manual_seed(1)
    y = torch.empty(B).uniform_(-3, 3, generator=gen)
    yk, yu = y + torch.randn(M, B, generator=gen), y + torch.randn(M, B, generator=gen)
    h = 2 * torch.randn(M, B, D, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (yk, yu, y, h)]
    fwd, bwd = torch.ops.mim_fast.kgs_loss_forward, torch.ops.mim_fast.kgs_loss_backward
    w = [1.0, 1.0, 1.0, 1.0]
    one = torch.ones(())

    def kernel():
        out = fwd(yk, yu, y, h, True, 10.0, False, w, "mean", 1e-12, True, True)
        bwd(one, None, None, None, None, out[7], out[8], w, torch.float32, torch.float32, torch.float32)

    def op_fwd():
        with torch.no_grad():
            mim_fast.kgs_loss(yk, yu, y, h)

    def op_fwd_bwd():
        for t in leaves:
            t.grad = None
        mim_fast.kgs_loss(*leaves).loss.backward()

    def eager_fwd_bwd():
        for t in leaves:
            t.grad = None
        reference.kgs_loss(*leaves).loss.backward()

    return {"kernel": kernel, "op fwd": op_fwd, "op fwd+bwd": op_fwd_bwd, "eager fwd+bwd": eager_fwd_bwd}


def _dropout_calls(T=50, B=16, D=80, p=0.3):
    """MIM's residual dropout site (T, B, D), batch_dim 1, forward and backward: the kernel's op alone,
    the public call (the common call: straight to the op, C++ autograd), the same call through the
    checked path (ops/dropout.py's full path: argument checks, the Python op), torch's F.dropout."""
    import importlib

    module = importlib.import_module("mim_fast.ops.dropout")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(T, B, D, generator=gen)
    G = torch.randn(T, B, D, generator=gen)
    index = torch.randperm(1000, generator=gen)[:B]
    xg = x.clone().requires_grad_()
    key = mim_fast.dropout_key(11, 3)
    apply = torch.ops.mim_fast.dropout_apply

    def kernel():
        apply(x, index, key, p, 1)
        apply(G, index, key, p, 1)

    def op_fwd_bwd():
        xg.grad = None
        torch.autograd.backward([mim_fast.dropout(xg, p, seed=11, index=index, batch_dim=1, stream=3)], [G])

    common = module._common_call

    def checked_fwd_bwd():
        module._common_call = lambda *a: None
        try:
            op_fwd_bwd()
        finally:
            module._common_call = common

    def eager_fwd_bwd():
        xg.grad = None
        torch.autograd.backward([torch.nn.functional.dropout(xg, p, training=True)], [G])

    return {"kernel": kernel, "op fwd+bwd": op_fwd_bwd, "checked path fwd+bwd": checked_fwd_bwd,
            "eager fwd+bwd": eager_fwd_bwd}


def measure(calls: dict, reps: int) -> dict:
    names = list(calls)
    for _ in range(50):  # warm-up
        for n in names:
            calls[n]()
    times = {n: [] for n in names}
    for r in range(reps):
        for k in range(len(names)):
            n = names[(r + k) % len(names)]
            t0 = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: {"median_us": 1e6 * statistics.median(ts),
                "p20_us": 1e6 * statistics.quantiles(ts, n=5)[0], "p80_us": 1e6 * statistics.quantiles(ts, n=5)[3]}
            for n, ts in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "torch": torch.__version__, "load": os.getloadavg()[0]},
              "gate T50 B16 D80 fp32": measure(_gate_calls(), args.reps),
              "kgs M3 B16 D80 fp32": measure(_kgs_calls(), args.reps),
              "dropout T50 B16 D80 fp32 p0.3": measure(_dropout_calls(), args.reps)}
    result["machine"]["load_after"] = os.getloadavg()[0]
    for case, rows in result.items():
        if case == "machine":
            continue
        print(case)
        eager = rows["eager fwd+bwd"]["median_us"]
        for name, r in rows.items():
            print("  %-21s %8.1f µs  (p20 %.1f, p80 %.1f)%s" % (name, r["median_us"], r["p20_us"], r["p80_us"],
                  "   %.2fx eager" % (eager / r["median_us"]) if name == "op fwd+bwd" else ""))
    print("load average %.1f -> %.1f (2 cores)" % (result["machine"]["load"], result["machine"]["load_after"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
