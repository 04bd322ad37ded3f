"""Small forward+backward calls of every fused op, for compute-sanitizer (memcheck, racecheck).

The edge cases where an out-of-bounds access or a race would hide: T = B = D = 1, D = 1030 (a ragged
last feature tile) in bfloat16, lengths containing 0 and T (an empty sample, a full one), a batch-first
view (strided x), KGS with and without its heads and with both routings, the noise kernel with 64-bit
counters. Each call is checked against the reference, so a kernel that reads garbage is also caught
when the sanitizer is not there to see it.

    compute-sanitizer --tool memcheck python benchmarks/sanitizer_cases.py [--device cuda] [--backends cuda,triton]

Prints one line per case and "sanitizer cases: N passed, M failed"; exit 1 if any failed. On a CPU
(gpu_check.sh's dry run) the same cases run with the cpu backend (and triton under TRITON_INTERPRET=1).
"""
import argparse
import sys
import traceback

import torch

import mim_fast
from mim_fast.ops import _backends


def gate_cases():
    # (T, B, D, dtype, lengths, batch_first)
    yield 1, 1, 1, torch.float32, None, False
    yield 7, 3, 1030, torch.bfloat16, None, False
    yield 9, 4, 33, torch.float32, [0, 9, 4, 1], False
    yield 9, 4, 130, torch.float16, [9, 0, 0, 3], True
    yield 50, 16, 80, torch.float32, None, True


def run_gate(backend, device, T, B, D, dtype, lengths, batch_first):
    gen = torch.Generator().manual_seed(T * 131 + B * 7 + D)
    x = torch.randn((B, T, D) if batch_first else (T, B, D), generator=gen).to(device, dtype)
    logits = (2 * torch.randn(B, T, generator=gen) - 3).to(device)
    lens = torch.tensor(lengths, device=device) if lengths is not None else None
    G = torch.randn(B, D, generator=gen).to(device, dtype)
    results = []
    for b in (backend, "torch"):
        xg, lg = x.clone().requires_grad_(), logits.clone().requires_grad_()
        out = mim_fast.purify_gate(xg, lg, seed=11, offset=5, lengths=lens, batch_first=batch_first, backend=b)
        torch.autograd.backward([out.pooled, out.penalty], [G, torch.ones((), device=device)])
        # and the mask-learner update's backward (x frozen: no ∂L/∂x written)
        lg2 = logits.clone().requires_grad_()
        out2 = mim_fast.purify_gate(x, lg2, seed=11, offset=5, lengths=lens, batch_first=batch_first, backend=b)
        torch.autograd.backward([out2.pooled, out2.penalty], [G, torch.ones((), device=device)])
        results.append((out.gate, out.pooled, xg.grad, lg.grad, lg2.grad))
    got, ref = results
    assert torch.equal(got[0], ref[0]), "gates differ from the reference"
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for a, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a.float(), r.float(), **tol)


def kgs_cases():
    # (M, B, D, dtype, per_sample, reduction, heads)
    yield 2, 1, 1, torch.float32, True, "mean", False
    yield 3, 16, 80, torch.float32, False, "mean", False
    yield 3, 17, 1030, torch.bfloat16, True, "none", False
    yield 3, 16, 80, torch.float32, True, "sum", True
    yield 3, 9, 130, torch.float16, False, "mean", True


def run_kgs(backend, device, M, B, D, dtype, per_sample, reduction, heads):
    gen = torch.Generator().manual_seed(M * 1000 + B * 10 + D)
    y = torch.empty(B).uniform_(-3, 3, generator=gen).to(device, dtype)
    if heads:
        ins = [(0.5 * torch.randn(M, B, D, generator=gen)).to(device, dtype),
               (0.5 * torch.randn(M, B, D, generator=gen)).to(device, dtype),
               (0.1 * torch.randn(M, D, generator=gen)).to(device, dtype), torch.randn(M, generator=gen).to(device, dtype)]
        fn = mim_fast.kgs_loss_with_heads
    else:
        ins = [(y.float().cpu() + torch.randn(M, B, generator=gen)).to(device, dtype),
               (y.float().cpu() + torch.randn(M, B, generator=gen)).to(device, dtype),
               (2 * torch.randn(M, B, D, generator=gen)).to(device, dtype)]
        ins = ins[:2] + [y] + ins[2:]
        fn = mim_fast.kgs_loss
    results = []
    for b in (backend, "torch"):
        leaves = [t.clone().requires_grad_() for t in ins]
        args = leaves + [y] if heads else leaves
        out = fn(*args, per_sample=per_sample, reduction=reduction, backend=b)
        (out.loss.sum() + out.inter.sum()).backward()
        results.append((out.teacher, out.loss, *[t.grad for t in leaves]))
    got, ref = results
    assert torch.equal(got[0], ref[0]), "teachers differ from the reference"
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for a, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a.float(), r.float(), **tol)


def run_philox(backend, device):
    for seed, offset, n in ((0, 0, 1), (2**63 - 1, 2**32 - 7, 1025), (12345, 2**40, 3000)):
        got = mim_fast.philox_uniform(seed, offset, (n,), device=device, backend=backend)
        ref = mim_fast.philox_uniform(seed, offset, (n,), device=device, backend="torch")
        assert torch.equal(got, ref), (seed, offset, n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None, help="comma-separated (default: cuda,triton on a GPU; cpu,triton on a CPU)")
    args = p.parse_args(argv)
    backends = args.backends.split(",") if args.backends else (["cuda", "triton"] if args.device == "cuda"
                                                              else ["cpu", "triton"])
    passed = failed = 0

    def case(name, fn, *a):
        nonlocal passed, failed
        try:
            fn(*a)
            passed += 1
            print("ok     %s" % name, flush=True)
        except Exception:  # noqa: BLE001 — report every case, then the exit status
            failed += 1
            print("FAILED %s\n%s" % (name, traceback.format_exc()), flush=True)

    for backend in backends:
        for op, gen, fn in (("purify_gate", gate_cases, run_gate), ("kgs_loss", kgs_cases, run_kgs)):
            for params in gen():
                dtype = params[3]
                reason = _backends.backend_status(op, args.device, (dtype,))[backend]
                name = "%s %s %s" % (backend, op, " ".join(str(v).replace("torch.", "") for v in params))
                if reason:
                    print("skip   %s: %s" % (name, reason), flush=True)
                    continue
                case(name, fn, backend, args.device, *params)
        reason = _backends.backend_status("philox_uniform", args.device, (torch.float32,))[backend]
        if reason:
            print("skip   %s philox_uniform: %s" % (backend, reason), flush=True)
        else:
            case("%s philox_uniform" % backend, run_philox, backend, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print("sanitizer cases: %d passed, %d failed" % (passed, failed))
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
