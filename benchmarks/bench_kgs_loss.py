"""pytest-benchmark suite of the KGS loss (SPEC §2), forward + backward of ``loss``.

Providers: "eager" (mim_fast.reference.kgs_loss, PyTorch eager), "compile" (torch.compile of the same
function), and the fused backends "cpu", "triton", "cuda" where they can run. Shapes: M = 3, B ∈ {16,
256, 4096, 65536}, D ∈ {80, 768}, float32 (inputs on the GPU when one is present, except "cpu").

Every case reports in ``benchmark.extra_info``:
  launches  kernels one forward+backward runs, the fill of backward()'s seed gradient included: CUDA
            kernels on a GPU; on the CPU the compute ops the profiler sees (ATen ops that do work,
            mim_fast ops, inductor's fused C++ kernels)
  bytes     the minimal traffic, h read once and ∂L/∂h written once: 2·M·B·D·sizeof(h)
  GB/s      bytes / median time

Run:  python -m pytest benchmarks/bench_kgs_loss.py                     (timings)
      python -m pytest benchmarks/bench_kgs_loss.py --benchmark-disable (smoke test: each case once)
Skipped: the Triton interpreter beyond toy sizes; the CPU at B = 65536 with D = 768 (600 MB per (M, B,
D) tensor; eager needs several GB) unless MIM_FAST_BENCH_BIG=1. In --benchmark-disable mode only the
small shapes run (torch.compile would otherwise recompile for every shape).
"""
import os
import time

import pytest
import torch

import torch._inductor.config as inductor_config

import mim_fast
from mim_fast import bench, reference
from mim_fast.ops import _backends

# Inductor's C++ kernels then appear as profiler events (a record_function each), so their launches can
# be counted; set before anything is compiled, since it is read at code generation.
inductor_config.cpp.enable_kernel_profile = True

M = 3
BATCHES = (16, 256, 4096, 65536)
FEATURES = (80, 768)
PROVIDERS = ("eager", "compile", "cpu", "triton", "cuda")
ON_GPU = torch.cuda.is_available()
BIG = os.environ.get("MIM_FAST_BENCH_BIG") == "1"
# ATen ops that only allocate or describe memory: not counted as launches on the CPU.
_METADATA_OPS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::as_strided",
                 "aten::expand", "aten::t", "aten::transpose", "aten::detach", "aten::unsqueeze", "aten::squeeze",
                 "aten::select", "aten::slice", "aten::alias", "aten::resolve_conj", "aten::resolve_neg",
                 "aten::lift_fresh", "aten::_reshape_alias", "aten::reshape", "aten::unbind", "aten::permute",
                 "aten::result_type", "aten::contiguous", "aten::to", "aten::_to_copy", "aten::item",
                 "aten::_local_scalar_dense", "aten::set_", "aten::expand_as", "aten::new_empty",
                 "aten::new_empty_strided", "aten::is_nonzero", "detach", "aten::zeros", "aten::zero_"}
_COMPILED = {}


def _device(provider):
    return "cuda" if ON_GPU and provider != "cpu" else "cpu"


def _skip_reason(provider, B, D, disabled):
    device = _device(provider)
    if provider in ("cpu", "triton", "cuda"):
        reason = _backends.backend_status("kgs_loss", device, (torch.float32,))[provider]
        if reason:
            return reason
    if provider == "triton" and device == "cpu" and B * D > 256 * 80:
        return "the Triton interpreter (~1 ms per program) only runs toy sizes"
    if device == "cpu" and B * D > 65536 * 80 and not BIG:
        return "600 MB per (M, B, D) tensor on a CPU: set MIM_FAST_BENCH_BIG=1"
    if disabled and B * D > 256 * 768:
        return "smoke mode (--benchmark-disable) runs the small shapes only"
    return None


def _loss_fn(provider):
    if provider == "eager":
        return reference.kgs_loss
    if provider == "compile":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(reference.kgs_loss)
        return _COMPILED["fn"]
    return lambda *a: mim_fast.kgs_loss(*a, backend=provider)


def _inputs(B, D, device):
    g = torch.Generator().manual_seed(B * 1000 + D)
    y = torch.empty(B).uniform_(-3, 3, generator=g)
    yk = y + torch.randn(M, B, generator=g)
    yu = y + torch.randn(M, B, generator=g)
    h = 2 * torch.randn(M, B, D, generator=g)
    return [t.to(device).requires_grad_() for t in (yk, yu, y, h)]


def _count_launches(step, device):
    """Kernels one call of step() runs (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.lower().startswith(("memcpy", "memset")))

    def counted(e):
        if "cpp_fused" in e.name or e.name.startswith("mim_fast::"):
            return True
        if not e.name.startswith("aten::") or e.name in _METADATA_OPS:
            return False
        if any(c.name.startswith("aten::") and c.name not in _METADATA_OPS for c in e.cpu_children):
            return False  # a composite op: its children are counted
        parent = e.cpu_parent
        while parent is not None:  # inside a fused op: that op is the launch
            if parent.name.startswith("mim_fast::"):
                return False
            parent = parent.cpu_parent
        return True

    return sum(1 for e in events if counted(e))


@pytest.mark.parametrize("D", FEATURES, ids=lambda d: "D%d" % d)
@pytest.mark.parametrize("B", BATCHES, ids=lambda b: "B%d" % b)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_kgs_loss_forward_backward(benchmark, provider, B, D):
    disabled = getattr(benchmark, "disabled", False)
    reason = _skip_reason(provider, B, D, disabled)
    if reason:
        pytest.skip(reason)
    device = _device(provider)
    ins = _inputs(B, D, device)
    fn = _loss_fn(provider)

    def step():
        for t in ins:
            t.grad = None
        fn(*ins).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up: compilation, autotuning, the allocator and the huge-page pool
        step()
    benchmark.group = "kgs_loss fwd+bwd M=%d B=%d D=%d float32" % (M, B, D)
    t0 = time.perf_counter()
    benchmark(step)
    elapsed = time.perf_counter() - t0
    launches = _count_launches(step, device)  # after timing: a profiler session slows later eager calls
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.median if stats is not None else elapsed
    nbytes = bench.minimal_bytes("kgs_loss", "fwd+bwd", {"M": M, "B": B, "D": D}, ins[3].dtype)
    benchmark.extra_info.update({"provider": provider, "device": device, "launches": launches, "bytes": nbytes,
                                 "GB/s": round(nbytes / seconds / 1e9, 3), "median_ms": round(seconds * 1e3, 4)})
    print("\n  %-8s M=%d B=%-6d D=%-4d %9.3f ms%s  %3d launches  %7.2f GB/s"
          % (provider, M, B, D, seconds * 1e3, " (one run)" if stats is None else "", launches,
             nbytes / seconds / 1e9))
