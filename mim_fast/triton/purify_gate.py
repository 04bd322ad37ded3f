"""Triton kernels of the fused purification gate (SPEC §1): the ``"triton"`` backend of purify_gate.

Same contract and layout as the C++/CUDA kernels (csrc/purify_gate.cpp, kernels/purify_gate.cu): one
program per (sample b, block of features) computes the gate row of b a tile of time steps at a time
(mim_fast/triton/_math.py, bit-identical to mim_math.h) and streams x[t, b, :] over t.

Forward: reads x once (T·B·D elements), writes pooled (B·D) and the (B, T) gate state; a second
one-program launch reduces the penalty. Backward: reads x once, writes ∂L/∂x once (not at all when x
needs no gradient) and the per-block partial sums of ∂L/∂c; a second small launch combines ∂L/∂g.
Accumulation in float32.
"""
import torch
import triton
import triton.language as tl

from ._math import log32, sigmoid32, tanh32
from ._launch import check_tensors, device_guard
from .philox import philox_uniform_block

ACT_IDS = {"tanh": 0, "relu": 1, "identity": 2}


@triton.jit
def _activation(y, ACT: tl.constexpr):
    if ACT == 0:
        return tanh32(y)
    elif ACT == 1:
        return tl.where(y < 0.0, 0.0, y)  # relu(NaN) = NaN, as torch.relu
    else:
        return y


@triton.jit
def _activation_grad(y, ACT: tl.constexpr):
    if ACT == 0:
        th = tanh32(y)
        return 1.0 - th * th
    elif ACT == 1:
        return tl.where(y <= 0.0, 0.0, 1.0)  # relu'(0) = 0, as torch's autograd
    else:
        return tl.full(y.shape, 1.0, tl.float32)


@triton.jit
def _gate_forward_kernel(x_ptr, sT, sB, sD, logits_ptr, noise_ptr, lengths_ptr, seed, offset,
                         pooled_ptr, gate_ptr, ste_ptr, dq_ptr, pen_row_ptr, T, D, nblk,
                         loc_bias, beta, zeta_gamma, gamma, threshold, pen_shift, noise_lo, noise_hi,
                         SAMPLE: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                         ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // nblk).to(tl.int64)
    blk = pid % nblk
    d = (blk * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    dmask = d < D
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + b)
    else:
        length = T
    acc = tl.zeros((BLOCK_D,), tl.float32)
    pen = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        tmask = t < T
        bt = b * T + t
        a = tl.load(logits_ptr + bt, mask=tmask, other=0.0) + loc_bias
        if SAMPLE:
            if HAS_NOISE:
                u = tl.load(noise_ptr + bt, mask=tmask, other=0.5)
            else:
                u = philox_uniform_block(seed, offset + bt)
            u = tl.where(u < noise_lo, noise_lo, tl.where(u > noise_hi, noise_hi, u))
            ell = log32(u) - log32(1.0 - u)
            s = sigmoid32(tl.math.div_rn(ell + a, tl.full(a.shape, beta, tl.float32)))
            ds = tl.math.div_rn(s * (1.0 - s), tl.full(a.shape, beta, tl.float32))
        else:
            s = sigmoid32(a)
            ds = s * (1.0 - s)
        sbar = zeta_gamma * s + gamma
        c = tl.where(sbar < 0.0, 0.0, tl.where(sbar > 1.0, 1.0, sbar))  # NaN stays NaN
        valid = (t < length) & tmask
        # z: 0 or 1, NaN where c is NaN (a NaN logit or noise); padding is closed whatever it holds
        h = tl.where(valid, tl.where(c != c, c, tl.where(c > threshold, 1.0, 0.0)), 0.0)
        if blk == 0:  # the first feature block of each sample owns the (B, T) outputs
            q = sigmoid32(a - pen_shift)
            # −0.0 marks a clamped step (see _combine_kernel), NaN a NaN gate (mim_math.h gate_step). The
            # −0.0 is a negated zero tensor: a −0.0 literal (or tl.full) loses its sign in Triton.
            neg_zero = -tl.zeros(ds.shape, tl.float32)
            ste = tl.where((sbar >= 0.0) & (sbar <= 1.0), zeta_gamma * ds, tl.where(ds != ds, ds, neg_zero))
            tl.store(gate_ptr + bt, h, mask=tmask)
            tl.store(ste_ptr + bt, tl.where(valid, ste, 0.0), mask=tmask)
            tl.store(dq_ptr + bt, tl.where(valid, q * (1.0 - q), 0.0), mask=tmask)
            pen += tl.where(valid, q, 0.0)
        xv = tl.load(x_ptr + b * sB + t[:, None] * sT + d[None, :] * sD,
                     mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(_activation(xv * h[:, None], ACT), axis=0)  # φ(0) = 0 for the masked steps
    denom = tl.maximum(length, 1).to(tl.float32)  # an empty sample pools to 0
    tl.store(pooled_ptr + b * D + d, (acc / denom).to(pooled_ptr.dtype.element_ty), mask=dmask)
    if blk == 0:
        tl.store(pen_row_ptr + b, tl.sum(pen, axis=0))


@triton.jit
def _penalty_kernel(pen_row_ptr, lengths_ptr, B, T, penalty_ptr, inv_count_ptr, HAS_LENGTHS: tl.constexpr,
                    BLOCK: tl.constexpr):
    total = tl.zeros((BLOCK,), tl.float32)
    count = tl.zeros((BLOCK,), tl.int64)
    for b0 in range(0, B, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        m = b < B
        total += tl.load(pen_row_ptr + b, mask=m, other=0.0)
        if HAS_LENGTHS:
            count += tl.load(lengths_ptr + b, mask=m, other=0)
        else:
            count += tl.where(m, T, 0).to(tl.int64)
    n = tl.maximum(tl.sum(count, axis=0), 1).to(tl.float32)
    tl.store(penalty_ptr, tl.sum(total, axis=0) / n)
    tl.store(inv_count_ptr, 1.0 / n)


@triton.jit
def _gate_backward_kernel(x_ptr, sT, sB, sD, gp_ptr, gate_ptr, lengths_ptr, gx_ptr, gT, gB, gD, dc_part_ptr,
                          B, T, D, nblk, HAS_LENGTHS: tl.constexpr, WRITE_GX: tl.constexpr, ACT: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // nblk).to(tl.int64)
    blk = pid % nblk
    d = (blk * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    dmask = d < D
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + b)
    else:
        length = T
    # dy = (G / T)·φ'(y): the division first, as autograd of sum(...) / T computes it.
    gs = tl.load(gp_ptr + b * D + d, mask=dmask, other=0.0).to(tl.float32) / tl.maximum(length, 1).to(tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        tmask = t < T
        valid = (t < length) & tmask
        h = tl.load(gate_ptr + b * T + t, mask=tmask, other=0.0)
        xv = tl.load(x_ptr + b * sB + t[:, None] * sT + d[None, :] * sD,
                     mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        gy = gs[None, :] * _activation_grad(xv * h[:, None], ACT)
        gy = tl.where(valid[:, None], gy, 0.0)  # padding: zero gradient
        if WRITE_GX:  # off when ∂L/∂x is not wanted: only the Σ_d reduction for ∂L/∂g
            tl.store(gx_ptr + t[:, None] * gT + b * gB + d[None, :] * gD,
                     (gy * h[:, None]).to(gx_ptr.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])
        tl.store(dc_part_ptr + (blk * B + b) * T + t, tl.sum(gy * xv, axis=1), mask=tmask)


@triton.jit
def _combine_kernel(dc_part_ptr, nblk, BT, ste_ptr, dq_ptr, grad_penalty_ptr, inv_count_ptr, out_ptr,
                    BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < BT
    dc = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, nblk):
        dc += tl.load(dc_part_ptr + k * BT + i, mask=m, other=0.0)
    wpen = tl.load(grad_penalty_ptr).to(tl.float32) * tl.load(inv_count_ptr)
    ste = tl.load(ste_ptr + i, mask=m, other=0.0)
    # the clamp selects (mim_math.h ste_times): a clamped step (ste = −0.0) passes no gradient, not NaN·0
    clamped = (ste == 0.0) & ((ste.to(tl.int32, bitcast=True) >> 31) != 0)
    out = tl.where(clamped, 0.0, ste * dc) + wpen * tl.load(dq_ptr + i, mask=m, other=0.0)
    tl.store(out_ptr + i, out, mask=m)


def _blocks(D: int, T: int, on_gpu: bool):
    # On GPUs: 128-wide feature blocks and 16-step tiles keep registers low and the grid large.
    # Under the interpreter every program costs ~1 ms of Python: few, large programs.
    if on_gpu:
        block_d = min(128, triton.next_power_of_2(D))
        block_t = 16
    else:
        block_d = triton.next_power_of_2(D)
        block_t = min(triton.next_power_of_2(T), max(16, 65536 // block_d))
    return block_t, block_d


def purify_gate_forward(x, logits, noise, lengths, seed, offset, mode, activation, loc_bias, beta, zeta_gamma,
                        gamma, threshold, pen_shift):
    """Same signature and results as torch.ops.mim_fast.purify_gate_forward (float32 accumulation)."""
    T, B, D = x.shape
    # lengths may be on the CPU (copied over below, as the C++ op does)
    dev = check_tensors("purify_gate_forward_triton", x, logits, noise)
    logits_f = logits.to(torch.float32).contiguous()
    noise_f = noise.to(torch.float32).contiguous() if noise is not None else None
    # clamped to [0, T] like the C++ ops (values on a GPU are not checked: that would need a host sync)
    lens = lengths.to(device=dev, dtype=torch.int64).clamp(0, T).contiguous() if lengths is not None else None
    pooled = torch.empty((B, D), dtype=x.dtype, device=dev)
    gate = torch.empty((B, T), dtype=torch.float32, device=dev)
    ste = torch.empty_like(gate)
    dq = torch.empty_like(gate)
    pen_row = torch.empty((B,), dtype=torch.float32, device=dev)
    penalty = torch.empty((), dtype=torch.float32, device=dev)
    inv_count = torch.empty((), dtype=torch.float32, device=dev)
    block_t, block_d = _blocks(D, T, dev.type == "cuda")
    nblk = triton.cdiv(D, block_d)
    dummy = logits_f  # never read when the matching HAS_* flag is off
    with device_guard(dev):
        _gate_forward_kernel[(B * nblk,)](
            x, x.stride(0), x.stride(1), x.stride(2), logits_f, noise_f if noise_f is not None else dummy,
            lens if lens is not None else dummy, seed, offset, pooled, gate, ste, dq, pen_row, T, D, nblk,
            float(loc_bias), float(beta), float(zeta_gamma), float(gamma), float(threshold), float(pen_shift),
            1e-6, 1.0 - 1e-6,
            SAMPLE=mode == "sample", HAS_NOISE=noise_f is not None, HAS_LENGTHS=lens is not None,
            ACT=ACT_IDS[activation], BLOCK_T=block_t, BLOCK_D=block_d, enable_fp_fusion=False)
        _penalty_kernel[(1,)](pen_row, lens if lens is not None else dummy, B, T, penalty, inv_count,
                              HAS_LENGTHS=lens is not None, BLOCK=min(1024, triton.next_power_of_2(B)))
    return (pooled, penalty.to(logits.dtype), gate.to(logits.dtype), ste, dq, inv_count)


def purify_gate_backward(grad_pooled, grad_penalty, x, gate, ste, dq, inv_count, lengths, activation,
                         needs_grad_x=True):
    """Same signature and results as torch.ops.mim_fast.purify_gate_backward (grad_x is a (0,) tensor,
    never written, when needs_grad_x is false)."""
    T, B, D = x.shape
    dev = check_tensors("purify_gate_backward_triton", x, grad_pooled, grad_penalty, gate, ste, dq, inv_count)
    G = grad_pooled.to(x.dtype).contiguous()
    h = gate.to(torch.float32).contiguous()
    lens = lengths.to(device=dev, dtype=torch.int64).clamp(0, T).contiguous() if lengths is not None else None
    grad_x = torch.empty_like(x) if needs_grad_x else x.new_empty((0,))
    gx_strides = grad_x.stride() if needs_grad_x else (0, 0, 0)
    block_t, block_d = _blocks(D, T, dev.type == "cuda")
    nblk = triton.cdiv(D, block_d)
    dc_part = torch.empty((nblk, B, T), dtype=torch.float32, device=dev)
    grad_logits = torch.empty((B, T), dtype=torch.float32, device=dev)
    BT = B * T
    block = 1024 if dev.type == "cuda" else triton.next_power_of_2(min(BT, 1 << 16))
    with device_guard(dev):
        _gate_backward_kernel[(B * nblk,)](
            x, x.stride(0), x.stride(1), x.stride(2), G, h, lens if lens is not None else h,
            grad_x if needs_grad_x else h, *gx_strides, dc_part, B, T, D, nblk,
            HAS_LENGTHS=lens is not None, WRITE_GX=bool(needs_grad_x), ACT=ACT_IDS[activation], BLOCK_T=block_t,
            BLOCK_D=block_d)
        _combine_kernel[(triton.cdiv(BT, block),)](dc_part, nblk, BT, ste.contiguous(), dq.contiguous(),
                                                   grad_penalty.contiguous(), inv_count, grad_logits, BLOCK=block)
    return grad_x, grad_logits.to(gate.dtype)
