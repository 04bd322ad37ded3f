"""Triton kernel of the fused counter-based dropout (contract: csrc/dropout.cpp): the ``"triton"`` backend
of :func:`mim_fast.dropout`. One program per BLOCK elements of the contiguous x, viewed as (outer, B, inner);
each draws u = uniform(word j mod 4 of Philox(key, index[b]·⌈S/4⌉ + ⌊j/4⌋)), j = o·inner + i, for its elements
and writes
y = x · (u ≥ p ? m : 0). Bytes: x read once, y written once; one launch."""
import torch
import triton
import triton.language as tl

from ._launch import check_tensors, device_guard
from .philox import philox_word_uniform


@triton.jit
def _dropout_kernel(x_ptr, y_ptr, index_ptr, n, B, inner, blocks, key, p, m, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    i = e % inner
    r = e // inner
    b = r % B
    o = r // B
    j = o * inner + i
    c = tl.load(index_ptr + b, mask=mask, other=0) * blocks + j // 4
    u = philox_word_uniform(key, c, j % 4)
    x = tl.load(x_ptr + e, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.where(u >= p, m, 0.0)
    tl.store(y_ptr + e, _round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_to(y, DTYPE: tl.constexpr):
    """float32 → DTYPE rounded to nearest, ties to even, as torch rounds (bit for bit: the masks must equal
    the CPU's). bfloat16 by hand: the interpreter's conversion truncates."""
    if DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(DTYPE)


def dropout_apply(x: torch.Tensor, index: torch.Tensor, key: int, p: float, batch_dim: int, m: float) -> torch.Tensor:
    """Same results as torch.ops.mim_fast.dropout_apply; ``m`` is the kept elements' factor already rounded
    to x's dtype (a float)."""
    dev = check_tensors("dropout_triton", x, index)
    xc = x.contiguous()
    y = torch.empty_like(xc, memory_format=torch.contiguous_format)
    n = xc.numel()
    if n == 0:
        return y
    B = x.shape[batch_dim]
    outer = 1
    for s in x.shape[:batch_dim]:
        outer *= s
    inner = n // (outer * B)
    # float32 p, as the reference compares float32 uniforms with float32(p)
    p32 = float(torch.tensor(p, dtype=torch.float32))
    block = 1024 if dev.type == "cuda" else 8192  # under the interpreter each program costs ~1 ms
    with device_guard(dev):
        _dropout_kernel[(triton.cdiv(n, block),)](xc, y, index.to(torch.int64).contiguous(), n, B, inner,
                                                  (outer * inner + 3) // 4, key, p32, float(m), BLOCK=block)
    return y
