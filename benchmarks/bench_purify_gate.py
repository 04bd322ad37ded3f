"""pytest-benchmark suite of the purification gate (SPEC §1): forward and forward+backward per provider.

Providers (each where it can run):
  eager    the published formulation in eager PyTorch (reference.purify_gate(exact_math=False))
  compile  torch.compile of that same function
  cpu      the fused C++ kernels (CPU tensors)
  cuda     the fused CUDA kernels
  triton   the fused Triton kernels (GPU only here: under the CPU interpreter timings mean nothing)

Every provider gets the same inputs, the noise as a (B, T) tensor (the published code draws it with
torch.rand; the fused kernels can also draw it in-kernel from a seed, the `cpu-seeded`/`cuda-seeded`
rows). Minimal bytes (the figure GB/s is computed from, in extra_info): forward = x read once + pooled
written; forward+backward = x read twice + ∂L/∂x written once (+ pooled); "fwd+bwd-logits" = the backward
with x frozen (MIM's mask-learner update: only ∂L/∂logits), x read twice. (B, T)-sized traffic is ignored.

Run:   python -m pytest benchmarks/bench_purify_gate.py --benchmark-json=out.json
Smoke: python -m pytest benchmarks/bench_purify_gate.py --benchmark-disable   (what CI does)
Shapes above ~40 M elements run on GPUs only unless MIM_FAST_BENCH_ALL=1.
"""
import os

import pytest
import torch

import mim_fast
from mim_fast import bench, reference
from mim_fast.ops import _backends

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [  # (T, B, D): the paper's size, the CPU target, production sizes
    (50, 16, 80),
    (50, 256, 768),
    (50, 2048, 768),
    (500, 64, 768),
]
DTYPES = [torch.float32, torch.bfloat16]
PROVIDERS = ["eager", "compile", "cpu", "cpu-seeded", "cuda", "cuda-seeded", "triton"]
BIG = 40_000_000


def _eager(x, logits, noise, seed):
    return reference.purify_gate(x, logits, noise=noise, exact_math=False)


_compiled = torch.compile(_eager)


def _fused(backend, seeded):
    def run(x, logits, noise, seed):
        if seeded:
            return mim_fast.purify_gate(x, logits, seed=seed, backend=backend)
        return mim_fast.purify_gate(x, logits, noise=noise, backend=backend)
    return run


def _provider(name):
    if name == "eager":
        return _eager
    if name == "compile":
        return _compiled
    backend = name.split("-")[0]
    if backend == "triton" and not CUDA:
        pytest.skip("Triton timings need a GPU (the CPU interpreter is a test vehicle)")
    reason = _backends.backend_status("purify_gate", DEVICE, (torch.float32,))[backend]
    if reason:
        pytest.skip(reason)
    return _fused(backend, name.endswith("seeded"))


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def minimal_bytes(T, B, D, dtype, pass_):
    return bench.minimal_bytes("purify_gate", pass_, {"T": T, "B": B, "D": D}, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%d-B%d-D%d" % s)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd", "fwd+bwd-logits"])
def test_purify_gate(benchmark, pass_, provider, shape, dtype):
    T, B, D = shape
    if T * B * D > BIG and not CUDA and os.environ.get("MIM_FAST_BENCH_ALL") != "1":
        pytest.skip("large shape: GPU only (MIM_FAST_BENCH_ALL=1 to force)")
    fn = _provider(provider)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(T, B, D, generator=gen).to(DEVICE, dtype)
    logits = (torch.randn(B, T, generator=gen) - 3.0).to(DEVICE)  # a = g + 3 around 0: a mix of open/closed
    noise = torch.rand(B, T, generator=gen).clamp(1e-6, 1 - 1e-6).to(DEVICE)
    G = torch.randn(B, D, generator=gen).to(DEVICE, dtype)
    backward = pass_ != "fwd"
    if backward:
        x.requires_grad_(pass_ == "fwd+bwd")
        logits.requires_grad_()

    def step():
        if backward:
            x.grad = None
            logits.grad = None
            out = fn(x, logits, noise, 1234)
            torch.autograd.backward([out.pooled, out.penalty], [G, torch.ones((), device=DEVICE)])
        else:
            with torch.no_grad():
                fn(x, logits, noise, 1234)
        _sync()

    step()  # warm-up (and torch.compile's compilation)
    benchmark.group = "purify_gate %s T=%d B=%d D=%d %s" % (pass_, T, B, D, str(dtype).replace("torch.", ""))
    benchmark.extra_info.update(T=T, B=B, D=D, dtype=str(dtype), provider=provider, device=DEVICE,
                                bytes=minimal_bytes(T, B, D, dtype, pass_))
    benchmark.pedantic(step, rounds=5 if T * B * D > 20_000_000 else 15, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = benchmark.extra_info["bytes"] / benchmark.stats.stats.median / 1e9
