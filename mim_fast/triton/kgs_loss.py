"""Triton kernels of the fused KGS loss (SPEC §2): the ``"triton"`` backend of kgs_loss.

Same contract as the C++/CUDA kernels (csrc/kgs_loss.cpp, kernels/kgs_loss.cu) and the same scalar math
(kernels/kgs_math.h, transcribed here): one program per block of BLOCK_B samples computes their errors,
routing (intra directions, Adjuster α, teacher), the softmax statistics of the teacher's and every
student's h row, the KL terms and — when asked — every per-term gradient. When a row fits one tile
(D ≤ BLOCK_D) each h row is loaded once and kept in registers; otherwise the statistics are an online
log-sum-exp over D-chunks and the KL pass re-reads the chunks (from L2 on a GPU).

Launches (forward): one; "mean"/"sum" finish in the last program to arrive (per-program partials and a
completion counter, zeroed by a 4-byte fill when per_sample=True). per_sample=False adds a first
one-program pass computing the 2M batch-mean errors (it also zeroes the counter). Backward: one launch.
Bytes: h read once, ∂inter/∂h written once (forward); saved ∂/∂h read once and ∂L/∂h written once
(backward); the rest is O(M·B). Accumulation in float32 (float64 for the cross-program sums).
"""
import contextlib

import torch
import triton
import triton.language as tl

from ..ops import _backends
from ._launch import check_tensors, device_guard

_REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}


@triton.jit
def _sign0(x):
    # sign(±0) = sign(NaN) = 0, as torch.sign (and so the derivative autograd gives |x|)
    return (x > 0.0).to(tl.float32) - (x < 0.0).to(tl.float32)


@triton.jit
def _div(x, y):
    # IEEE division (Triton's `/` is approximate on GPUs).
    return tl.math.div_rn(x, y)


@triton.jit
def _batch_means_kernel(yk_ptr, yu_ptr, y_ptr, yk_sM, yk_sB, yu_sM, yu_sB, y_s, means_ptr, counter_ptr, M, B,
                        RESET_COUNTER: tl.constexpr, BLOCK: tl.constexpr):
    """means[m] = mean_i |yk[m,i] − y[i]|, means[M + m] = mean_i |yu[m,i] − y[i]| (float errors summed in
    float64 in a fixed order); one program."""
    for m in range(0, M):
        mm = tl.cast(m, tl.int64)
        sk = tl.zeros((BLOCK,), tl.float64)
        su = tl.zeros((BLOCK,), tl.float64)
        for b0 in range(0, B, BLOCK):
            b = b0 + tl.arange(0, BLOCK).to(tl.int64)
            bmask = b < B
            yv = tl.load(y_ptr + b * y_s, mask=bmask, other=0.0).to(tl.float32)
            ek = tl.abs(tl.load(yk_ptr + mm * yk_sM + b * yk_sB, mask=bmask, other=0.0).to(tl.float32) - yv)
            eu = tl.abs(tl.load(yu_ptr + mm * yu_sM + b * yu_sB, mask=bmask, other=0.0).to(tl.float32) - yv)
            sk += tl.where(bmask, ek, 0.0).to(tl.float64)
            su += tl.where(bmask, eu, 0.0).to(tl.float64)
        tl.store(means_ptr + mm, (tl.sum(sk, axis=0) / B).to(tl.float32))
        tl.store(means_ptr + M + mm, (tl.sum(su, axis=0) / B).to(tl.float32))
    if RESET_COUNTER:
        tl.store(counter_ptr, 0)


@triton.jit
def _row_stats_chunked(h_ptr, row_off, rows, D, h_sD, inv_s, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """(max, log Σ exp(x − max)) of the rows x = h[row_off + d·h_sD]·inv_s selected by `rows`, as an
    online log-sum-exp over D-chunks (kgs_math.h softmax_add/softmax_merge: an element −inf adds 0)."""
    mx = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_B,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = rows[:, None] & (d < D)[None, :]
        x = tl.load(h_ptr + row_off[:, None] + d[None, :] * h_sD, mask=mask, other=0.0).to(tl.float32) * inv_s[:, None]
        x = tl.where(mask, x, float("-inf"))
        new = tl.maximum(mx, tl.max(x, axis=1))
        part = tl.sum(tl.where(mask & (x != float("-inf")), tl.exp(x - new[:, None]), 0.0), axis=1)
        s = tl.where(s == 0.0, 0.0, s * tl.exp(mx - new)) + part
        mx = tl.where(s == 0.0, mx, new)
    return mx, tl.log(s)


@triton.jit
def _round_prediction(v, PRED_ROUND: tl.constexpr):
    # a head's output rounded once to the predictions' dtype, as a Linear in that dtype would
    if PRED_ROUND == 1:
        return v.to(tl.float16).to(tl.float32)
    elif PRED_ROUND == 2:
        # round to nearest even in the bits (the interpreter's float32 → bfloat16 cast truncates); inf has
        # no low bits to carry, NaN is passed through
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    else:
        return v


@triton.jit
def _head_dot(h_ptr, row_off, bmask, D, h_sD, w_ptr, w_off, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Σ_d h[row_off + d·h_sD]·w[w_off + d] for each of the BLOCK_B rows (float32)."""
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        dmask = d < D
        x = tl.load(h_ptr + row_off[:, None] + d[None, :] * h_sD, mask=bmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        acc += x * tl.load(w_ptr + w_off + d, mask=dmask, other=0.0)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _heads_kernel(hm_ptr, hu_ptr, hm_sM, hm_sB, hm_sD, hu_sM, hu_sB, hu_sD, w_ptr, bias_ptr, pk_ptr, pu_ptr, M, B, D,
                  PRED_ROUND: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """kgs_loss_with_heads, per_sample=False: the (M, B) predictions of every sample, before the batch means."""
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    bmask = b < B
    for m in range(0, M):
        mm = tl.cast(m, tl.int64)
        bias = tl.load(bias_ptr + mm)
        pk = _head_dot(hm_ptr, mm * hm_sM + b * hm_sB, bmask, D, hm_sD, w_ptr, mm * D, BLOCK_B, BLOCK_D) + bias
        pu = _head_dot(hu_ptr, mm * hu_sM + b * hu_sB, bmask, D, hu_sD, w_ptr, mm * D, BLOCK_B, BLOCK_D) + bias
        tl.store(pk_ptr + mm * B + b, _round_prediction(pk, PRED_ROUND), mask=bmask)
        tl.store(pu_ptr + mm * B + b, _round_prediction(pu, PRED_ROUND), mask=bmask)


@triton.jit
def _adjuster_inv(yk_ptr, yk_sM, yk_sB, means_ptr, mm, b, bmask, yv, zero, sum_rk, eps, PER_SAMPLE: tl.constexpr):
    """1 / (1 + r_k / (Σ r + eps)) of modality mm (kgs_math.h adjuster_inv), r_k = |yk − y| per sample or
    the batch mean; read again in each α loop rather than kept in M registers."""
    if PER_SAMPLE:
        rk = tl.abs(tl.load(yk_ptr + mm * yk_sM + b * yk_sB, mask=bmask, other=0.0).to(tl.float32) - yv)
    else:
        rk = zero + tl.load(means_ptr + mm)
    return _div(zero + 1.0, 1.0 + _div(rk, sum_rk + eps))


@triton.jit
def _kgs_forward_kernel(yk_ptr, yu_ptr, y_ptr, h_ptr, yk_sM, yk_sB, yu_sM, yu_sB, y_s, h_sM, h_sB, h_sD, means_ptr,
                        loss_ptr, intra_ptr, inter_ptr, masked_ptr, unmasked_ptr, teacher_ptr, alpha_ptr,
                        gpred_ptr, gh_ptr, partial_ptr, counter_ptr, M, B, D, kd_scale, eps, scale,
                        w_intra, w_inter, w_masked, w_unmasked,
                        hu_ptr, hu_sM, hu_sB, hu_sD, head_w_ptr, head_b_ptr,
                        PER_SAMPLE: tl.constexpr, DIVIDE_T: tl.constexpr, REDUCTION: tl.constexpr,
                        GRAD_PREDS: tl.constexpr, GRAD_H: tl.constexpr, SINGLE_TILE: tl.constexpr,
                        HEADS: tl.constexpr, PRED_ROUND: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program per BLOCK_B samples. With HEADS (kgs_loss_with_heads, per_sample=True) the first
    modality loop computes the predictions from h (= h_masked) and hu with the heads and stores them in
    the (M, B) buffers yk_ptr/yu_ptr (strides (B, 1)), which the later loops read back."""
    pid = tl.program_id(0)
    b = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    bmask = b < B
    yv = tl.load(y_ptr + b * y_s, mask=bmask, other=0.0).to(tl.float32)
    zero = tl.zeros((BLOCK_B,), tl.float32)

    # --- errors, intra routing, teacher scan (modality order, kgs_math.h TeacherScan) -----------------
    intra = zero
    masked = zero
    unmasked = zero
    sum_rk = zero
    best = tl.full((BLOCK_B,), float("inf"), tl.float32)
    t_idx = tl.zeros((BLOCK_B,), tl.int64)
    count = tl.zeros((BLOCK_B,), tl.int32)
    any_nan = b < 0  # all false
    for m in range(0, M):
        mm = tl.cast(m, tl.int64)
        if HEADS:
            bias = tl.load(head_b_ptr + mm)
            ykv = _round_prediction(_head_dot(h_ptr, mm * h_sM + b * h_sB, bmask, D, h_sD, head_w_ptr, mm * D,
                                              BLOCK_B, BLOCK_D) + bias, PRED_ROUND)
            yuv = _round_prediction(_head_dot(hu_ptr, mm * hu_sM + b * hu_sB, bmask, D, hu_sD, head_w_ptr, mm * D,
                                              BLOCK_B, BLOCK_D) + bias, PRED_ROUND)
            tl.store(yk_ptr + mm * yk_sM + b * yk_sB, ykv, mask=bmask)
            tl.store(yu_ptr + mm * yu_sM + b * yu_sB, yuv, mask=bmask)
        else:
            ykv = tl.load(yk_ptr + mm * yk_sM + b * yk_sB, mask=bmask, other=0.0).to(tl.float32)
            yuv = tl.load(yu_ptr + mm * yu_sM + b * yu_sB, mask=bmask, other=0.0).to(tl.float32)
        ek = tl.abs(ykv - yv)
        eu = tl.abs(yuv - yv)
        masked += ek
        unmasked += eu
        if PER_SAMPLE:
            rk = ek
            ru = eu
        else:
            rk = zero + tl.load(means_ptr + mm)
            ru = zero + tl.load(means_ptr + M + mm)
        sum_rk += rk
        any_nan = any_nan | (rk != rk)
        lower = rk < best
        count = tl.where(lower, 1, tl.where(rk == best, count + 1, count))
        t_idx = tl.where(lower, mm, t_idx)
        best = tl.where(lower, rk, best)
        I = rk < ru  # masked branch better: it teaches the unmasked one
        J = rk > ru  # the reverse; ties and NaN: no transfer
        diff = ykv - yuv
        intra += tl.where(I | J, diff * diff, 0.0)
        if GRAD_PREDS:  # (J ? r : 0)·2(yk − yu): 0·NaN stays NaN, as in the reference (kgs_math.h intra_term)
            g = gpred_ptr + mm * B + b
            tl.store(g, tl.where(J, scale, 0.0) * (2.0 * diff), mask=bmask)
            tl.store(g + M * B, tl.where(I, scale, 0.0) * (2.0 * (yuv - ykv)), mask=bmask)
            tl.store(g + 2 * M * B, scale * _sign0(ykv - yv), mask=bmask)
            tl.store(g + 3 * M * B, scale * _sign0(yuv - yv), mask=bmask)
    has_t = bmask & (~any_nan) & (count == 1)
    tl.store(teacher_ptr + b, tl.where(has_t, t_idx, -1), mask=bmask)
    if HEADS:
        tl.debug_barrier()  # the predictions stored above are read back below

    # --- Adjuster α (kgs_math.h adjuster_inv / adjuster_alpha) -----------------------------------------
    sum_inv = zero
    for m in range(0, M):
        mm = tl.cast(m, tl.int64)
        sum_inv += _adjuster_inv(yk_ptr, yk_sM, yk_sB, means_ptr, mm, b, bmask, yv, zero, sum_rk, eps, PER_SAMPLE)
    alpha_t = zero
    for m in range(0, M):
        mm = tl.cast(m, tl.int64)
        inv = _adjuster_inv(yk_ptr, yk_sM, yk_sB, means_ptr, mm, b, bmask, yv, zero, sum_rk, eps, PER_SAMPLE)
        alpha = _div(M * inv, sum_inv)
        tl.store(alpha_ptr + mm * B + b, alpha.to(alpha_ptr.dtype.element_ty), mask=bmask)
        alpha_t = tl.where(t_idx == mm, alpha, alpha_t)

    # --- distillation (kgs_math.h distill_constants, kl_element) ---------------------------------------
    kd_T = kd_scale * alpha_t
    if DIVIDE_T:
        s = tl.where(has_t, kd_T, 1.0)
    else:
        s = zero + 1.0
    inv_s = _div(zero + 1.0, s)
    half_T2 = 0.5 * (kd_T * kd_T)
    coef = _div(half_T2 * scale, s)
    t_row = tl.where(has_t, t_idx, 0) * h_sM + b * h_sB  # (BLOCK_B,) element offsets of the teacher rows
    kl = zero
    if SINGLE_TILE:
        d = tl.arange(0, BLOCK_D).to(tl.int64)
        dmask = d < D
        tmask = has_t[:, None] & dmask[None, :]
        xt = tl.load(h_ptr + t_row[:, None] + d[None, :] * h_sD, mask=tmask, other=0.0).to(tl.float32) * inv_s[:, None]
        xt = tl.where(tmask, xt, float("-inf"))
        mx_t = tl.where(has_t, tl.max(xt, axis=1), 0.0)
        zt = xt - mx_t[:, None]
        ls_t = tl.log(tl.sum(tl.where(tmask, tl.exp(zt), 0.0), axis=1))
        log_p = zt - ls_t[:, None]
        p = tl.exp(log_p)
        for m in range(0, M):
            mm = tl.cast(m, tl.int64)
            student = has_t & (t_idx != mm)
            smask = student[:, None] & dmask[None, :]
            xm = tl.load(h_ptr + (mm * h_sM + b * h_sB)[:, None] + d[None, :] * h_sD, mask=smask,
                         other=0.0).to(tl.float32) * inv_s[:, None]
            xm = tl.where(smask, xm, float("-inf"))
            mx_m = tl.where(student, tl.max(xm, axis=1), 0.0)
            zm = xm - mx_m[:, None]
            log_q = zm - tl.log(tl.sum(tl.where(smask, tl.exp(zm), 0.0), axis=1))[:, None]
            kl += tl.sum(tl.where(smask, p * (log_p - log_q), 0.0), axis=1)
            if GRAD_H:
                g = tl.where(smask, coef[:, None] * (tl.exp(log_q) - p), 0.0)
                tl.store(gh_ptr + (mm * B + b)[:, None] * D + d[None, :], g.to(gh_ptr.dtype.element_ty),
                         mask=bmask[:, None] & dmask[None, :])
    else:
        mx_t, ls_t = _row_stats_chunked(h_ptr, t_row, has_t, D, h_sD, inv_s, BLOCK_B, BLOCK_D)
        mx_t = tl.where(has_t, mx_t, 0.0)
        for m in range(0, M):
            mm = tl.cast(m, tl.int64)
            student = has_t & (t_idx != mm)
            m_row = mm * h_sM + b * h_sB
            mx_m, ls_m = _row_stats_chunked(h_ptr, m_row, student, D, h_sD, inv_s, BLOCK_B, BLOCK_D)
            mx_m = tl.where(student, mx_m, 0.0)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                dmask = d < D
                smask = student[:, None] & dmask[None, :]
                zt = tl.load(h_ptr + t_row[:, None] + d[None, :] * h_sD, mask=smask, other=0.0).to(tl.float32) \
                    * inv_s[:, None] - mx_t[:, None]
                zm = tl.load(h_ptr + m_row[:, None] + d[None, :] * h_sD, mask=smask, other=0.0).to(tl.float32) \
                    * inv_s[:, None] - mx_m[:, None]
                log_p = zt - ls_t[:, None]
                log_q = zm - ls_m[:, None]
                p = tl.exp(log_p)
                kl += tl.sum(tl.where(smask, p * (log_p - log_q), 0.0), axis=1)
                if GRAD_H:
                    g = tl.where(smask, coef[:, None] * (tl.exp(log_q) - p), 0.0)
                    tl.store(gh_ptr + (mm * B + b)[:, None] * D + d[None, :], g.to(gh_ptr.dtype.element_ty),
                             mask=bmask[:, None] & dmask[None, :])
    inter = tl.where(has_t, half_T2 * kl, 0.0)
    loss = w_intra * intra + w_inter * inter + w_masked * masked + w_unmasked * unmasked

    # --- outputs ---------------------------------------------------------------------------------------
    if REDUCTION == 2:
        tl.store(loss_ptr + b, loss.to(loss_ptr.dtype.element_ty), mask=bmask)
        tl.store(intra_ptr + b, intra.to(intra_ptr.dtype.element_ty), mask=bmask)
        tl.store(inter_ptr + b, inter.to(inter_ptr.dtype.element_ty), mask=bmask)
        tl.store(masked_ptr + b, masked.to(masked_ptr.dtype.element_ty), mask=bmask)
        tl.store(unmasked_ptr + b, unmasked.to(unmasked_ptr.dtype.element_ty), mask=bmask)
    else:
        part = partial_ptr + pid.to(tl.int64) * 5
        tl.store(part + 0, tl.sum(tl.where(bmask, loss, 0.0).to(tl.float64), axis=0))
        tl.store(part + 1, tl.sum(tl.where(bmask, intra, 0.0).to(tl.float64), axis=0))
        tl.store(part + 2, tl.sum(tl.where(bmask, inter, 0.0).to(tl.float64), axis=0))
        tl.store(part + 3, tl.sum(tl.where(bmask, masked, 0.0).to(tl.float64), axis=0))
        tl.store(part + 4, tl.sum(tl.where(bmask, unmasked, 0.0).to(tl.float64), axis=0))
        # acq_rel: this program's partials are visible to whoever draws the last ticket.
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        nprog = tl.num_programs(0)
        if ticket == nprog - 1:
            for k in tl.static_range(5):
                acc = tl.zeros((BLOCK_P,), tl.float64)
                for p0 in range(0, nprog, BLOCK_P):
                    q = p0 + tl.arange(0, BLOCK_P)
                    acc += tl.load(partial_ptr + q.to(tl.int64) * 5 + k, mask=q < nprog, other=0.0, volatile=True)
                total = tl.sum(acc, axis=0)
                if REDUCTION == 0:
                    total = total / B
                if k == 0:
                    tl.store(loss_ptr, total.to(tl.float32).to(loss_ptr.dtype.element_ty))
                elif k == 1:
                    tl.store(intra_ptr, total.to(tl.float32).to(intra_ptr.dtype.element_ty))
                elif k == 2:
                    tl.store(inter_ptr, total.to(tl.float32).to(inter_ptr.dtype.element_ty))
                elif k == 3:
                    tl.store(masked_ptr, total.to(tl.float32).to(masked_ptr.dtype.element_ty))
                else:
                    tl.store(unmasked_ptr, total.to(tl.float32).to(unmasked_ptr.dtype.element_ty))


@triton.jit
def _upstream(g_ptr, g_s, b, bmask, HAS: tl.constexpr):
    if HAS:
        return tl.load(g_ptr + b * g_s, mask=bmask, other=0.0).to(tl.float32)
    else:
        return tl.zeros(b.shape, tl.float32)


@triton.jit
def _kgs_backward_kernel(gl_ptr, gi_ptr, gx_ptr, gm_ptr, gu_ptr, gl_s, gi_s, gx_s, gm_s, gu_s,
                         w_intra, w_inter, w_masked, w_unmasked, saved_ptr, saved_h_ptr,
                         gyk_ptr, gyu_ptr, gy_ptr, gh_ptr, M, B, D,
                         HAS_GL: tl.constexpr, HAS_GI: tl.constexpr, HAS_GX: tl.constexpr, HAS_GM: tl.constexpr,
                         HAS_GU: tl.constexpr, HAS_PREDS: tl.constexpr, HAS_H: tl.constexpr,
                         INTRA_ON: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    bmask = b < B
    g_loss = _upstream(gl_ptr, gl_s, b, bmask, HAS_GL)
    # c_k = G_k + w_k·G_loss (kgs_math.h chain_factor)
    c_intra = _upstream(gi_ptr, gi_s, b, bmask, HAS_GI) + w_intra * g_loss
    c_inter = _upstream(gx_ptr, gx_s, b, bmask, HAS_GX) + w_inter * g_loss
    c_masked = _upstream(gm_ptr, gm_s, b, bmask, HAS_GM) + w_masked * g_loss
    c_unmasked = _upstream(gu_ptr, gu_s, b, bmask, HAS_GU) + w_unmasked * g_loss
    if HAS_PREDS:
        sk = tl.zeros((BLOCK_B,), tl.float32)
        su = tl.zeros((BLOCK_B,), tl.float32)
        for m in range(0, M):
            off = tl.cast(m, tl.int64) * B + b
            if INTRA_ON:  # the intra term was reached (its saved gradients may hold 0·NaN)
                ik = tl.load(saved_ptr + off, mask=bmask, other=0.0)
                iu = tl.load(saved_ptr + M * B + off, mask=bmask, other=0.0)
            else:
                ik = tl.zeros((BLOCK_B,), tl.float32)
                iu = tl.zeros((BLOCK_B,), tl.float32)
            mk = tl.load(saved_ptr + 2 * M * B + off, mask=bmask, other=0.0)
            mu = tl.load(saved_ptr + 3 * M * B + off, mask=bmask, other=0.0)
            tl.store(gyk_ptr + off, (c_intra * ik + c_masked * mk).to(gyk_ptr.dtype.element_ty), mask=bmask)
            tl.store(gyu_ptr + off, (c_intra * iu + c_unmasked * mu).to(gyu_ptr.dtype.element_ty), mask=bmask)
            sk += mk
            su += mu
        tl.store(gy_ptr + b, (-(c_masked * sk + c_unmasked * su)).to(gy_ptr.dtype.element_ty), mask=bmask)
    if HAS_H:
        for m in range(0, M):
            row = (tl.cast(m, tl.int64) * B + b) * D
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                mask = bmask[:, None] & (d < D)[None, :]
                v = tl.load(saved_h_ptr + row[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(gh_ptr + row[:, None] + d[None, :], (c_inter[:, None] * v).to(gh_ptr.dtype.element_ty),
                         mask=mask)


@contextlib.contextmanager
def _launching(device: torch.device):
    """Around every launch: the tensors' device made current (``device_guard``), and under the
    interpreter numpy's warnings silenced — the kernels run as numpy code there, which warns on the
    −inf/NaN arithmetic of masked-off lanes (values tl.where discards); compiled kernels do not warn."""
    with device_guard(device):
        if _backends.triton_interpreting():
            import numpy as np

            with np.errstate(all="ignore"):
                yield
        else:
            yield


def _tiles(B: int, D: int, on_gpu: bool, block_d=None):
    """(BLOCK_B, BLOCK_D, SINGLE_TILE). GPUs: rows up to 2048 wide stay in registers, ~2K elements per
    tile. Interpreter (~1 ms of Python per program): few, large programs."""
    if on_gpu:
        block_d = block_d or (triton.next_power_of_2(D) if D <= 2048 else 1024)
        block_b = max(1, min(triton.next_power_of_2(B), 2048 // block_d))
    else:
        block_d = block_d or (triton.next_power_of_2(D) if D <= 8192 else 4096)
        block_b = max(1, min(triton.next_power_of_2(B), 65536 // block_d))
    return block_b, block_d, D <= block_d


def kgs_loss_forward(yk, yu, y, h, per_sample, kd_scale, kd_divide_T, weights, reduction, eps, grad_preds, grad_h,
                     block_d=None):
    """Same signature and results as torch.ops.mim_fast.kgs_loss_forward (float32 accumulation).

    ``block_d`` overrides the feature tile (tests use it to exercise the chunked path)."""
    out_dtype = torch.promote_types(torch.promote_types(yk.dtype, yu.dtype), torch.promote_types(y.dtype, h.dtype))
    return _forward(yk, yu, y, h, None, out_dtype, per_sample, kd_scale, kd_divide_T, weights, reduction, eps,
                    grad_preds, grad_h, block_d)


def kgs_loss_heads_forward(h_masked, h_unmasked, weight, bias, y, per_sample, kd_scale, kd_divide_T, weights, reduction,
                           eps, grad_preds, grad_h, block_d=None):
    """Same signature and results as torch.ops.mim_fast.kgs_loss_heads_forward: the predictions come from
    the heads inside the fused pass (per_sample=False: from a first heads pass, for the batch means)."""
    pred_dtype = torch.promote_types(torch.promote_types(h_masked.dtype, h_unmasked.dtype),
                                     torch.promote_types(weight.dtype, bias.dtype))
    out_dtype = torch.promote_types(pred_dtype, y.dtype)
    pred_round = {torch.float16: 1, torch.bfloat16: 2}.get(pred_dtype, 0)
    heads = (h_unmasked, weight.to(torch.float32).contiguous(), bias.to(torch.float32).contiguous(), pred_round)
    M, B, _ = h_masked.shape
    preds = torch.empty((2, M, B), dtype=torch.float32, device=h_masked.device)  # yk, yu
    return _forward(preds[0], preds[1], y, h_masked, heads, out_dtype, per_sample, kd_scale, kd_divide_T, weights,
                    reduction, eps, grad_preds, grad_h, block_d)


def _forward(yk, yu, y, h, heads, out_dtype, per_sample, kd_scale, kd_divide_T, weights, reduction, eps, grad_preds,
             grad_h, block_d):
    M, B = yk.shape
    D = h.shape[2]
    dev = check_tensors("kgs_loss_forward_triton", yk, yu, y, h, *(heads[:3] if heads is not None else ()))
    red = _REDUCTIONS[reduction]
    term_shape = (B,) if red == 2 else ()
    terms = [torch.empty(term_shape, dtype=out_dtype, device=dev) for _ in range(5)]
    teacher = torch.empty((B,), dtype=torch.int64, device=dev)
    alpha = torch.empty((M, B), dtype=out_dtype, device=dev)
    saved_preds = torch.empty((4, M, B) if grad_preds else (0,), dtype=torch.float32, device=dev)
    saved_h = torch.empty((M, B, D) if grad_h else (0,), dtype=h.dtype, device=dev)
    block_b, block_d, single = _tiles(B, D, dev.type == "cuda", block_d)
    nprog = triton.cdiv(B, block_b)
    dummy = torch.empty((1,), dtype=torch.float32, device=dev)  # bound to pointers a flag switches off
    means = torch.empty((2 * M,), dtype=torch.float32, device=dev) if not per_sample else dummy
    if red != 2:
        partials = torch.empty((nprog, 5), dtype=torch.float64, device=dev)
        # the batch-means pass zeroes the counter itself; otherwise a 4-byte fill does
        counter = torch.empty((1,), dtype=torch.int32, device=dev) if not per_sample else \
            torch.zeros((1,), dtype=torch.int32, device=dev)
    else:
        partials, counter = dummy, dummy
    scale = 1.0 / B if red == 0 else 1.0
    w = [float(v) for v in weights]
    hu, head_w, head_b, pred_round = heads if heads is not None else (dummy.view(1, 1, 1), dummy, dummy, 0)
    with _launching(dev):
        if heads is not None and not per_sample:  # the batch means need every prediction first
            _heads_kernel[(nprog,)](h, hu, h.stride(0), h.stride(1), h.stride(2), hu.stride(0), hu.stride(1),
                                    hu.stride(2), head_w, head_b, yk, yu, M, B, D, PRED_ROUND=pred_round,
                                    BLOCK_B=block_b, BLOCK_D=block_d)
        if not per_sample:
            _batch_means_kernel[(1,)](yk, yu, y, yk.stride(0), yk.stride(1), yu.stride(0), yu.stride(1), y.stride(0),
                                      means, counter, M, B, RESET_COUNTER=red != 2,
                                      BLOCK=min(1024 if dev.type == "cuda" else 65536, triton.next_power_of_2(B)))
        _kgs_forward_kernel[(nprog,)](
            yk, yu, y, h, yk.stride(0), yk.stride(1), yu.stride(0), yu.stride(1), y.stride(0),
            h.stride(0), h.stride(1), h.stride(2), means, *terms, teacher, alpha,
            saved_preds if grad_preds else dummy, saved_h if grad_h else dummy, partials, counter,
            M, B, D, float(kd_scale), float(eps), scale, *w,
            hu, hu.stride(0), hu.stride(1), hu.stride(2), head_w, head_b,
            PER_SAMPLE=bool(per_sample), DIVIDE_T=bool(kd_divide_T), REDUCTION=red, GRAD_PREDS=bool(grad_preds),
            GRAD_H=bool(grad_h), SINGLE_TILE=single, HEADS=heads is not None and bool(per_sample),
            PRED_ROUND=pred_round, BLOCK_B=block_b, BLOCK_D=block_d,
            BLOCK_P=min(1024, triton.next_power_of_2(nprog)))
    return (*terms, teacher, alpha, saved_preds, saved_h)


def kgs_loss_backward(grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked, saved_preds, saved_h, weights,
                      yk_dtype, yu_dtype, y_dtype):
    """Same signature and results as torch.ops.mim_fast.kgs_loss_backward."""
    has_preds, has_h = saved_preds.numel() > 0, saved_h.numel() > 0
    M, B = (saved_preds.shape[1], saved_preds.shape[2]) if has_preds else \
        ((saved_h.shape[0], saved_h.shape[1]) if has_h else (0, 0))
    D = saved_h.shape[2] if has_h else 1
    dev = check_tensors("kgs_loss_backward_triton", saved_preds, saved_h, grad_loss, grad_intra, grad_inter,
                        grad_masked, grad_unmasked)
    gyk = torch.empty((M, B) if has_preds else (0,), dtype=yk_dtype, device=dev)
    gyu = torch.empty((M, B) if has_preds else (0,), dtype=yu_dtype, device=dev)
    gy = torch.empty((B,) if has_preds else (0,), dtype=y_dtype, device=dev)
    gh = torch.empty_like(saved_h, memory_format=torch.contiguous_format)
    if M * B == 0:
        return gyk, gyu, gy, gh
    dummy = torch.empty((1,), dtype=torch.float32, device=dev)  # bound to pointers a flag switches off
    gs = [grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked]
    ptrs = [g if g is not None else dummy for g in gs]
    strides = [0 if (g is None or g.dim() == 0) else g.stride(0) for g in gs]
    on_gpu = dev.type == "cuda"
    block_d = min(triton.next_power_of_2(D), 1024 if on_gpu else 8192)
    block_b = max(1, min(triton.next_power_of_2(B), (2048 if on_gpu else 65536) // block_d))
    with _launching(dev):
        _kgs_backward_kernel[(triton.cdiv(B, block_b),)](
            *ptrs, *strides, *(float(v) for v in weights), saved_preds if has_preds else dummy,
            saved_h if has_h else dummy, gyk if has_preds else dummy, gyu if has_preds else dummy,
            gy if has_preds else dummy, gh if has_h else dummy, M, B, D,
            HAS_GL=grad_loss is not None, HAS_GI=grad_intra is not None, HAS_GX=grad_inter is not None,
            HAS_GM=grad_masked is not None, HAS_GU=grad_unmasked is not None, HAS_PREDS=has_preds, HAS_H=has_h,
            INTRA_ON=grad_intra is not None or grad_loss is not None, BLOCK_B=block_b, BLOCK_D=block_d)
    return gyk, gyu, gy, gh


@triton.jit
def _kgs_heads_backward_kernel(gl_ptr, gi_ptr, gx_ptr, gm_ptr, gu_ptr, gl_s, gi_s, gx_s, gm_s, gu_s,
                               w_intra, w_inter, w_masked, w_unmasked, saved_ptr, gh_ptr,
                               hm_ptr, hm_sM, hm_sB, hm_sD, hu_ptr, hu_sM, hu_sB, hu_sD, head_w_ptr,
                               ghm_ptr, ghu_ptr, gw_ptr, gb_ptr, gy_ptr, M, B, D, n_dblk,
                               HAS_GL: tl.constexpr, HAS_GI: tl.constexpr, HAS_GX: tl.constexpr,
                               HAS_GM: tl.constexpr, HAS_GU: tl.constexpr, NEED_HM: tl.constexpr,
                               NEED_HU: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                               NEED_Y: tl.constexpr, INTRA_ON: tl.constexpr, YK_ON: tl.constexpr,
                               YU_ON: tl.constexpr, INTER_ON: tl.constexpr, BLOCK_B: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    """One program per (modality m, feature block), looping over every sample: it owns its slice of
    ∂L/∂weight (and program (m, 0) ∂L/∂bias[m], program (0, 0) ∂L/∂y), so the reductions over B need no
    atomics and have one fixed order."""
    pid = tl.program_id(0)
    m = (pid // n_dblk).to(tl.int64)
    dblk = pid % n_dblk
    d = (dblk * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    dmask = d < D
    w_row = tl.load(head_w_ptr + m * D + d, mask=dmask, other=0.0)
    # *_ON: the paths a gradient reached (one no gradient reached contributes nothing, not 0·x)
    acc_w = tl.zeros((BLOCK_D,), tl.float32)
    acc_b = tl.zeros((BLOCK_B,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        bmask = b < B
        mask2 = bmask[:, None] & dmask[None, :]
        g_loss = _upstream(gl_ptr, gl_s, b, bmask, HAS_GL)
        c_intra = _upstream(gi_ptr, gi_s, b, bmask, HAS_GI) + w_intra * g_loss
        c_inter = _upstream(gx_ptr, gx_s, b, bmask, HAS_GX) + w_inter * g_loss
        c_masked = _upstream(gm_ptr, gm_s, b, bmask, HAS_GM) + w_masked * g_loss
        c_unmasked = _upstream(gu_ptr, gu_s, b, bmask, HAS_GU) + w_unmasked * g_loss
        off = m * B + b
        mk = tl.load(saved_ptr + 2 * M * B + off, mask=bmask, other=0.0)
        mu = tl.load(saved_ptr + 3 * M * B + off, mask=bmask, other=0.0)
        if INTRA_ON:  # the intra term was reached (its saved gradients may hold 0·NaN)
            gk = c_intra * tl.load(saved_ptr + off, mask=bmask, other=0.0) + c_masked * mk
            gu = c_intra * tl.load(saved_ptr + M * B + off, mask=bmask, other=0.0) + c_unmasked * mu
        else:
            gk = c_masked * mk
            gu = c_unmasked * mu
        rows = off[:, None] * D + d[None, :]
        if NEED_HM:
            g = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
            if YK_ON:
                g += gk[:, None] * w_row[None, :]
            if INTER_ON:
                g += c_inter[:, None] * tl.load(gh_ptr + rows, mask=mask2, other=0.0).to(tl.float32)
            tl.store(ghm_ptr + rows, g.to(ghm_ptr.dtype.element_ty), mask=mask2)
        if NEED_HU:
            tl.store(ghu_ptr + rows, (gu[:, None] * w_row[None, :]).to(ghu_ptr.dtype.element_ty), mask=mask2)
        if NEED_W:
            if YK_ON:
                x = tl.load(hm_ptr + (m * hm_sM + b * hm_sB)[:, None] + d[None, :] * hm_sD, mask=mask2,
                            other=0.0).to(tl.float32)
                acc_w += tl.sum(gk[:, None] * x, axis=0)
            if YU_ON:
                x = tl.load(hu_ptr + (m * hu_sM + b * hu_sB)[:, None] + d[None, :] * hu_sD, mask=mask2,
                            other=0.0).to(tl.float32)
                acc_w += tl.sum(gu[:, None] * x, axis=0)
        if NEED_B:
            if dblk == 0:
                if YK_ON:
                    acc_b += tl.where(bmask, gk, 0.0)
                if YU_ON:
                    acc_b += tl.where(bmask, gu, 0.0)
        if NEED_Y:
            if pid == 0:
                sk = tl.zeros((BLOCK_B,), tl.float32)
                su = tl.zeros((BLOCK_B,), tl.float32)
                for mm in range(0, M):
                    o2 = tl.cast(mm, tl.int64) * B + b
                    sk += tl.load(saved_ptr + 2 * M * B + o2, mask=bmask, other=0.0)
                    su += tl.load(saved_ptr + 3 * M * B + o2, mask=bmask, other=0.0)
                tl.store(gy_ptr + b, (-(c_masked * sk + c_unmasked * su)).to(gy_ptr.dtype.element_ty), mask=bmask)
    if NEED_W:
        tl.store(gw_ptr + m * D + d, acc_w, mask=dmask)
    if NEED_B:
        if dblk == 0:
            tl.store(gb_ptr + m, tl.sum(acc_b, axis=0))


def kgs_loss_heads_backward(grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked, saved_preds, saved_h,
                            h_masked, h_unmasked, weight, weights, needs, bias_dtype, y_dtype):
    """Same signature and results as torch.ops.mim_fast.kgs_loss_heads_backward. One launch of M ×
    ceil(D / BLOCK_D) programs, each looping over the B samples (so on GPUs its parallelism is M·D/BLOCK_D
    programs: enough for MIM's batch sizes, not a bandwidth-optimal schedule for huge B)."""
    M, B, D = h_masked.shape
    dev = check_tensors("kgs_loss_heads_backward_triton", h_masked, h_unmasked, weight, saved_preds, saved_h,
                        grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked)
    ghm = torch.empty((M, B, D) if needs[0] else (0,), dtype=h_masked.dtype, device=dev)
    ghu = torch.empty((M, B, D) if needs[1] else (0,), dtype=h_masked.dtype, device=dev)
    gw = torch.empty((M, D) if needs[2] else (0,), dtype=torch.float32, device=dev)
    gb = torch.empty((M,) if needs[3] else (0,), dtype=torch.float32, device=dev)
    gy = torch.empty((B,) if needs[4] else (0,), dtype=y_dtype, device=dev)
    if any(needs):
        dummy = torch.empty((1,), dtype=torch.float32, device=dev)
        gs = [grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked]
        has = [g is not None for g in gs]
        ptrs = [g if g is not None else dummy for g in gs]
        strides = [0 if (g is None or g.dim() == 0) else g.stride(0) for g in gs]
        on_gpu = dev.type == "cuda"
        block_d = min(triton.next_power_of_2(D), 128 if on_gpu else 8192)
        block_b = max(1, min(triton.next_power_of_2(B), (4096 if on_gpu else 65536) // block_d))
        n_dblk = triton.cdiv(D, block_d)
        w32 = weight.to(torch.float32).contiguous()
        with _launching(dev):
            _kgs_heads_backward_kernel[(M * n_dblk,)](
                *ptrs, *strides, *(float(v) for v in weights), saved_preds,
                saved_h if saved_h.numel() > 0 else dummy,
                h_masked, h_masked.stride(0), h_masked.stride(1), h_masked.stride(2),
                h_unmasked, h_unmasked.stride(0), h_unmasked.stride(1), h_unmasked.stride(2), w32,
                ghm if needs[0] else dummy, ghu if needs[1] else dummy, gw if needs[2] else dummy,
                gb if needs[3] else dummy, gy if needs[4] else dummy, M, B, D, n_dblk,
                HAS_GL=grad_loss is not None, HAS_GI=grad_intra is not None, HAS_GX=grad_inter is not None,
                HAS_GM=grad_masked is not None, HAS_GU=grad_unmasked is not None, NEED_HM=bool(needs[0]),
                NEED_HU=bool(needs[1]), NEED_W=bool(needs[2]), NEED_B=bool(needs[3]), NEED_Y=bool(needs[4]),
                INTRA_ON=has[0] or has[1], YK_ON=has[0] or has[1] or has[3], YU_ON=has[0] or has[1] or has[4],
                INTER_ON=has[0] or has[2], BLOCK_B=block_b, BLOCK_D=block_d)
    return ghm, ghu, gw.to(weight.dtype), gb.to(bias_dtype), gy
