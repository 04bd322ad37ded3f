"""The demo (README's first command until ``mim-fast train`` lands): both MIM ops on MIM-sized random
inputs, with every backend that can run here, checked against the reference and timed."""
import time

import torch

import mim_fast
from mim_fast.info import report
from mim_fast.ops import _backends


def _time(fn, repeat: int = 20) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(device=None) -> int:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    T, B, D, M = 50, 16, 80, 3  # the paper's sizes: 50 steps, batch 16, width 80, text/audio/vision
    print(report())
    print("\n== purify_gate: x (T=%d, B=%d, D=%d), logits (B, T), seed 1234, mode sample, tanh ==" % (T, B, D))
    x = torch.randn(T, B, D, device=device)
    logits = torch.randn(B, T, device=device) - 3.0  # a = g + 3 around 0: a mix of open and closed gates
    ref = None
    for name in _backends.available_backends("purify_gate", device):
        xg, lg = x.clone().requires_grad_(), logits.clone().requires_grad_()
        out = mim_fast.purify_gate(xg, lg, seed=1234, backend=name)
        (out.pooled.square().sum() + out.penalty).backward()
        res = tuple(t.detach() for t in (out.pooled, out.penalty, out.gate, xg.grad, lg.grad))
        ref = ref or res
        diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(res, ref))
        ms = 1e3 * _time(lambda: mim_fast.purify_gate(x, logits, seed=1234, backend=name))
        print("  %-7s gate open %5.1f%%  penalty %.4f  |pooled| %.4f  |dx| %.4f  |dg| %.4f  "
              "max diff vs %s %.2e  fwd %.3f ms"
              % (name, 100 * float(res[2].mean()), float(res[1]), float(res[0].norm()),
                 float(res[3].norm()), float(res[4].norm()), "torch", diff, ms))

    print("\n== kgs_loss: M=%d modalities, B=%d, D=%d, per-sample routing ==" % (M, B, D))
    y = torch.empty(B, device=device).uniform_(-3, 3)
    yk, yu = y + torch.randn(M, B, device=device), y + torch.randn(M, B, device=device)
    h = torch.randn(M, B, D, device=device)
    ref = None
    for name in _backends.available_backends("kgs_loss", device):
        ins = [t.clone().requires_grad_() for t in (yk, yu, y, h)]
        out = mim_fast.kgs_loss(*ins, backend=name)
        out.loss.backward()
        res = tuple(t.detach() for t in (out.loss, out.intra, out.inter, out.masked, out.unmasked, out.alpha)) + tuple(
            t.grad for t in ins)
        ref = ref or res
        diff = max(float((a.double() - b.double()).abs().max()) for a, b in zip(res, ref))
        ms = 1e3 * _time(lambda: mim_fast.kgs_loss(yk, yu, y, h, backend=name))
        print("  %-7s loss %.4f = intra %.4f + inter %.4f + masked %.4f + unmasked %.4f; teachers %s; "
              "max diff vs torch %.2e  fwd %.3f ms"
              % (name, *(float(v) for v in res[:5]),
                 torch.bincount(out.teacher + 1, minlength=M + 1).tolist(), diff, ms))
    print("  (teachers: counts of [no teacher, modality 0, 1, 2])")
    return 0
