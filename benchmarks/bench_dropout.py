"""pytest-benchmark suite of counter-based dropout (mim_fast.dropout) against torch's own, forward and
forward+backward, at the shapes of MIM's Transformer encoders (B=16, T=50, D=80: the residual/ReLU sites
(T, B, D) and (T, B, 4D), the attention probabilities (B, H, T, T)).

Providers: ``torch`` (F.dropout: torch's generator, a stored mask), ``keyed-ref`` (the composed reference,
backend "torch"), ``keyed-cpu`` / ``keyed-cuda`` / ``keyed-triton`` (the fused kernels). Bytes: x read
once, y written once (the backward the same on the gradient).

Run:   python -m pytest benchmarks/bench_dropout.py --benchmark-json=out.json
Smoke: python -m pytest benchmarks/bench_dropout.py --benchmark-disable   (what CI does)
"""
import pytest
import torch
import torch.nn.functional as F

import mim_fast
from mim_fast.ops import _backends

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [((50, 16, 80), 1), ((50, 16, 320), 1), ((16, 5, 50, 50), 0)]
PROVIDERS = ["torch", "keyed-ref", "keyed-cpu", "keyed-cuda", "keyed-triton"]


def _fn(provider, batch_dim, B):
    if provider == "torch":
        return lambda x: F.dropout(x, 0.3, training=True)
    backend = {"keyed-ref": "torch"}.get(provider, provider.split("-")[-1])
    if backend == "triton" and not CUDA:
        pytest.skip("Triton timings need a GPU (the CPU interpreter is a test vehicle)")
    if backend != "torch":
        reason = _backends.backend_status("philox_uniform", DEVICE, (torch.float32,))[backend]
        if reason:
            pytest.skip(reason)
    index = torch.arange(B, device=DEVICE)
    return lambda x: mim_fast.dropout(x, 0.3, seed=12345, index=index, batch_dim=batch_dim, backend=backend)


@pytest.mark.parametrize("shape,batch_dim", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_dropout(benchmark, pass_, provider, shape, batch_dim):
    fn = _fn(provider, batch_dim, shape[batch_dim])
    x = torch.randn(shape, device=DEVICE, requires_grad=pass_ == "fwd+bwd")
    g = torch.randn(shape, device=DEVICE)

    def step():
        if pass_ == "fwd":
            with torch.no_grad():
                fn(x)
        else:
            x.grad = None
            fn(x).backward(g)
        if CUDA:
            torch.cuda.synchronize()

    step()
    benchmark.group = "dropout %s %s" % (pass_, "x".join(map(str, shape)))
    benchmark.extra_info.update(shape=list(shape), provider=provider, device=DEVICE,
                                bytes=2 * x.numel() * x.element_size() * (2 if pass_ == "fwd+bwd" else 1))
    benchmark.pedantic(step, rounds=30, warmup_rounds=2)
