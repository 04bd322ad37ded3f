"""Triton kernel for :func:`mim_fast.philox_uniform`: u[i] = tl.rand(seed, offset + i).

The 64-bit counter is passed to Philox as (lo32, hi32, 0, 0) explicitly rather than through
``tl.rand`` so the stream does not depend on how a Triton version treats int64 offsets.
Bytes: 8·n read (the counters), 4·n written; one launch.
"""
import torch
import triton
import triton.language as tl

from ._launch import check_tensors, device_guard


@triton.jit
def philox_uniform_block(seed, counters):
    """float32 uniforms in [0, 1) for an int64 block of counters (the gate kernels call this too)."""
    lo = counters.to(tl.uint32)
    hi = (counters >> 32).to(tl.uint32)
    zero = lo * 0
    w, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    return tl.uint_to_uniform_float(w)


@triton.jit
def _philox_uniform_kernel(counters_ptr, out_ptr, n, seed, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    u = philox_uniform_block(seed, tl.load(counters_ptr + idx, mask=mask, other=0))
    tl.store(out_ptr + idx, u, mask=mask)


def philox_uniform_counters(counters: torch.Tensor, seed: int) -> torch.Tensor:
    """u[i] = tl.rand(seed, counters[i]) for an int64 tensor of counters (any shape), float32, same shape."""
    check_tensors("philox_uniform_triton", counters)
    counters = counters.to(torch.int64).contiguous()
    out = torch.empty(counters.shape, dtype=torch.float32, device=counters.device)
    n = out.numel()
    if n == 0:
        return out
    # Big blocks: under TRITON_INTERPRET=1 each program instance costs ~1 ms of Python.
    block = 1024 if out.is_cuda else 4096
    with device_guard(out.device):
        _philox_uniform_kernel[(triton.cdiv(n, block),)](counters, out, n, seed, BLOCK=block)
    return out
