"""The eager PyTorch implementation of shared/SPEC.md: the test oracle and the ``"torch"`` backend.

Every formula here is written as close to the spec as PyTorch allows, with autograd providing the
backward. Fused backends are tested against these functions. Nothing here checks arguments: the
public functions in :mod:`mim_fast` do that before calling in.

Numerics
--------
* Compute dtype: float64 when any floating input is float64, otherwise float32 (float16/bfloat16
  inputs are upcast); results are cast back (see each function).
* Noise: Philox4x32-10 keyed by (seed, counter), bit-identical to Triton's ``tl.rand``; the gate's
  noise is ``u[b, t] = philox_uniform(seed, offset + b·T + t)`` clamped to [1e-6, 1 − 1e-6].
* Deterministic: no atomics, no randomness beyond the (seed, offset) noise.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from ._types import KGSLossOutput, PurifyGateOutput

__all__ = [
    "philox4x32_10",
    "philox_uniform",
    "philox_uniform_counters",
    "philox_uniform4",
    "exp32",
    "log32",
    "sigmoid32",
    "tanh32",
    "gate_open_probability",
    "purify_gate",
    "KGSRouting",
    "kgs_routing",
    "kgs_terms",
    "kgs_loss",
    "kgs_heads",
    "kgs_loss_with_heads",
]

# ----------------------------------------------------------------------------------------------------
# Counter-based noise (Philox4x32-10), in int64 torch ops so it runs on any device
# ----------------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
# float32(4.6566127342e-10): the largest float s with (2^31 - 1)·s < 1 (Triton's uint_to_uniform_float).
_UNIFORM_SCALE = float.fromhex("0x1.fffffep-32")
NOISE_EPS = 1e-6


def _mulhilo32(a: torch.Tensor, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a·b for uint32 values a (held in int64) and a uint32 constant b.

    int64 cannot hold a 64-bit product, so b is split into 16-bit halves: both partial products
    stay below 2^48.
    """
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _M32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 (Salmon et al., SC'11) on uint32 words held in int64 tensors (or Python ints for k).

    Same round function and key schedule as Triton's ``tl.philox``. Returns the four output words.
    """
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def philox_uniform_counters(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1): ``tl.rand(seed, counters)`` for int64 ``counters`` of any shape.

    The 64-bit counter n is the Philox counter (lo32(n), hi32(n), 0, 0); the key is (lo32(seed),
    hi32(seed)). The first output word w becomes a float as in Triton: v = w as int32, v = ~v if
    v < 0, u = float32(v) · float32(4.6566127342e-10).
    """
    return philox_uniform4(seed, counters)[0]


def philox_uniform4(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """(4, *counters.shape) float32: all four output words of each Philox block (counter n, key seed as in
    :func:`philox_uniform_counters`), each made a uniform the same way; word 0 is ``tl.rand``'s."""
    n = counters.to(torch.int64)
    lo = n & _M32
    hi = (n >> 32) & _M32
    zero = torch.zeros_like(lo)
    words = torch.stack(philox4x32_10(lo, hi, zero, zero, seed & _M32, (seed >> 32) & _M32))
    v = torch.where(words >= 2**31, _M32 - words, words)  # ~int32(w) for the negative half, as an unsigned value
    return v.to(torch.float32) * torch.full((), _UNIFORM_SCALE, dtype=torch.float32, device=v.device)


def philox_uniform(seed: int, offset: int, shape: Sequence[int], device=None) -> torch.Tensor:
    """float32 tensor of ``shape`` with u[idx] = tl.rand(seed, offset + row-major linear index of idx)."""
    numel = math.prod(shape)
    counters = torch.arange(numel, dtype=torch.int64, device=device) + offset
    return philox_uniform_counters(seed, counters).reshape(tuple(shape))


def draw_seed() -> int:
    """A fresh Philox seed from torch's default CPU generator (so torch.manual_seed makes it repeatable)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


# ----------------------------------------------------------------------------------------------------
# float32 exp / log / sigmoid / tanh from IEEE basic operations (kernels/mim_math.h, operation for
# operation): the gate's decisions 1[c > τ] are then bit-identical on every backend and device, which
# libm/libdevice/Sleef transcendentals (each rounding its last bit its own way) would not give.
# ----------------------------------------------------------------------------------------------------
_H = float.fromhex
_EXP_COEFFS = [_H("0x1.a01a02p-13"), _H("0x1.6c16c2p-10"), _H("0x1.111112p-7"), _H("0x1.555556p-5"),
               _H("0x1.555556p-3"), 0.5, 1.0, 1.0]  # 1/7! ... 1/0!
_LOG_COEFFS = [_H("0x1.745d18p-4"), _H("0x1.c71c72p-4"), _H("0x1.24924ap-3"), _H("0x1.99999ap-3"),
               _H("0x1.555556p-2")]  # 1/11, 1/9, 1/7, 1/5, 1/3
_TANH_COEFFS = [-_H("0x1.9c1070p-8"), _H("0x1.596866p-6"), -_H("0x1.b92e5ap-5"), _H("0x1.110d50p-3"),
                -_H("0x1.55554cp-2")]  # fitted odd polynomial on [0, 0.55)


def exp32(x: torch.Tensor) -> torch.Tensor:
    """e^x for float32 x: 0 below −87, +inf above 88, NaN for NaN (mim_math.h exp32)."""
    t = x * _H("0x1.715476p+0")
    kf = (t + _H("0x1.8p+23")) - _H("0x1.8p+23")
    r = x - kf * _H("0x1.63p-1")
    r = r - kf * -_H("0x1.bd0106p-13")
    p = torch.full_like(x, _EXP_COEFFS[0])
    for c in _EXP_COEFFS[1:]:
        p = p * r + c
    in_range = (x >= -87.0) & (x <= 88.0)
    k = torch.where(in_range, kf, torch.zeros_like(kf)).to(torch.int32)
    scaled = p * ((k + 127) << 23).view(torch.float32)
    return torch.where(x < -87.0, torch.zeros_like(x), torch.where(x > 88.0, torch.full_like(x, math.inf), scaled))


def log32(x: torch.Tensor) -> torch.Tensor:
    """ln(x) for float32 x (normal numbers; 0 → −inf, < 0 or NaN → NaN) (mim_math.h log32)."""
    bits = x.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).view(torch.float32)
    hi = m > _H("0x1.6a09e6p+0")
    m = torch.where(hi, m * 0.5, m)
    e = e + hi.to(torch.int32)
    f = m - 1.0
    s = f / (2.0 + f)
    w = s * s
    p = torch.full_like(x, _LOG_COEFFS[0])
    for c in _LOG_COEFFS[1:]:
        p = p * w + c
    log1p_f = (s + s) + (s + s) * (w * p)
    ef = e.to(torch.float32)
    r = ef * _H("0x1.62e4p-1") + (log1p_f + ef * _H("0x1.7f7d1cp-20"))
    special = torch.where(x == 0, torch.full_like(x, -math.inf),
                          torch.where(x == math.inf, torch.full_like(x, math.inf), torch.full_like(x, math.nan)))
    return torch.where((x > 0) & (x < math.inf), r, special)


def tanh32(x: torch.Tensor) -> torch.Tensor:
    """tanh for float32 x (mim_math.h tanh32, the CPU kernels' activation)."""
    ax = x.abs()
    x2 = x * x
    p = torch.full_like(x, _TANH_COEFFS[0])
    for c in _TANH_COEFFS[1:]:
        p = p * x2 + c
    small = x + x * (x2 * p)
    big = 1.0 - 2.0 / (exp32(ax + ax) + 1.0)
    return torch.where(ax < 0.55, small, torch.copysign(big, x))


def _sigmoid32_value(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + exp32(-x))


class _Sigmoid32(torch.autograd.Function):
    """σ through exp32, with σ's usual derivative σ(1 − σ) (the forward's bit tricks have none)."""

    @staticmethod
    def forward(ctx, x):
        s = _sigmoid32_value(x)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return grad * (s * (1.0 - s))


def sigmoid32(x: torch.Tensor) -> torch.Tensor:
    """σ(x) = 1 / (1 + exp32(−x)) for float32 x, differentiable (mim_math.h sigmoid32)."""
    return _Sigmoid32.apply(x)


# ----------------------------------------------------------------------------------------------------
# SPEC §1: purification gate (hard-concrete gate + gated mean pooling)
# ----------------------------------------------------------------------------------------------------
def _gate_functions(acc: torch.dtype, exact_math: bool):
    """(log, sigmoid) for the gate: the bit-reproducible float32 versions, or torch's own (float64, or
    exact_math=False: the plain formulation the published code uses, e.g. as a benchmark baseline)."""
    if acc == torch.float32 and exact_math:
        return log32, sigmoid32
    return torch.log, torch.sigmoid


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def penalty_log_ratio(penalty: str, gamma: float, zeta: float, threshold: float) -> float:
    """ln(−γ/ζ) for penalty "mim" (q = P(c > 0)); ln((τ−γ)/(ζ−τ)) for "threshold" (q = P(c > τ))."""
    if penalty == "mim":
        return math.log(-gamma / zeta)
    return math.log((threshold - gamma) / (zeta - threshold))


def gate_open_probability(logits: torch.Tensor, *, penalty: str = "mim", beta: float = 1 / 3,
                          gamma: float = -0.2, zeta: float = 1.0, loc_bias: float = 3.0,
                          threshold: float = 0.6) -> torch.Tensor:
    """Per-step penalty q (B, T): σ(a − β·ln(−γ/ζ)) ("mim") or σ(a − β·ln((τ−γ)/(ζ−τ))) ("threshold").

    Under mode "sample", "threshold" is exactly P(gate open) = P(c > τ) and "mim" is P(c > 0).
    Computed in float32 (float64 for float64 logits), returned in the compute dtype.
    """
    acc = _compute_dtype(logits)
    a = logits.to(acc) + loc_bias
    _, sigmoid = _gate_functions(acc, exact_math=True)
    return sigmoid(a - beta * penalty_log_ratio(penalty, gamma, zeta, threshold))


def clamp_closed(t: torch.Tensor, lo: Optional[float] = None, hi: Optional[float] = None) -> torch.Tensor:
    """torch.clamp(t, lo, hi)'s value with the gradient SPEC §1 gives the gate's clamp: passed on the closed
    interval lo ≤ t ≤ hi, as the kernels do, and selected, not multiplied (none outside it, or at NaN, even
    where the incoming gradient is NaN). Not torch.clamp's own backward: its indicator at the bounds has
    changed between releases (torch 2.14 passes none at t = lo or hi)."""
    inside = torch.ones_like(t, dtype=torch.bool) if lo is None else t >= lo
    if hi is not None:
        inside = inside & (t <= hi)
    return torch.where(inside, t, torch.clamp(t.detach(), lo, hi))


def purify_gate(
    x: torch.Tensor,
    logits: torch.Tensor,
    *,
    noise: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    mode: str = "sample",
    activation: str = "tanh",
    penalty: str = "mim",
    lengths: Optional[torch.Tensor] = None,
    batch_first: bool = False,
    beta: float = 1 / 3,
    gamma: float = -0.2,
    zeta: float = 1.0,
    loc_bias: float = 3.0,
    threshold: float = 0.6,
    exact_math: bool = True,
) -> PurifyGateOutput:
    """SPEC §1, eager. x (T, B, D) or (B, T, D) with batch_first; logits (B, T); noise (B, T) or None.

    The noise is a constant: no gradient flows to ``noise``. In float32 the gate's log and sigmoid
    are :func:`log32` and :func:`sigmoid32`, so the gate equals the fused kernels' bit for bit;
    ``exact_math=False`` uses torch.log/torch.sigmoid instead (the published formulation).

    With ``lengths`` (B,), steps t ≥ lengths[b] are padding: the gate is forced closed with no
    gradient (neither through the straight-through path nor the penalty), x and the logits there are
    never read into the result, the pooling divides by lengths[b] (a sample of length 0 pools to 0), and
    the penalty is the mean of q over the valid steps only (0 when there are none).

    NaN policy (every backend): values propagate as SPEC §1's formulas compute them. A NaN logit or
    noise at a valid step makes c, hence the gate z, NaN: ``gate`` is NaN there and the sample's
    ``pooled`` is NaN in every feature (y = x·z); a NaN/±inf feature gives NaN through x·0 at a closed
    step. Gradients are autograd's of those formulas; the clamp passes gradient on the closed interval
    0 ≤ s̄ ≤ 1 (SPEC §1) and selects rather than multiplies: a clamped step passes no gradient to its logit
    even when ∂L/∂c is NaN. Padding is never read (see above), whatever it holds.
    """
    xs = x.transpose(0, 1) if batch_first else x  # (T, B, D) view, no copy
    T, B, _ = xs.shape
    acc = _compute_dtype(x, logits, noise)
    log, sigmoid = _gate_functions(acc, exact_math)
    g = logits.to(acc)
    if lengths is not None:
        lengths = lengths.to(x.device).clamp(0, T)  # (the public op rejects values outside [0, T] where it can look)
        valid = torch.arange(T, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        # Padding is never read, its logits included: a NaN there must not reach ∂L/∂logits through a
        # local derivative (0·NaN) any more than through the value.
        g = torch.where(valid, g, torch.zeros_like(g))
    a = g + loc_bias  # (B, T) log-alpha

    def const(v):
        # Divisors and comparands as tensors on the data's device: ATen turns a CUDA tensor divided by a
        # host scalar into a multiply by its reciprocal (not the IEEE quotient the kernels compute), which
        # would make the reference differ between CPU and CUDA, and from the kernels, in the last bit.
        # torch.full, not torch.tensor: a fill, no host-to-device copy (capturable in a CUDA graph).
        return torch.full((), v, dtype=acc, device=a.device)

    if mode == "sample":
        if noise is None:
            u = philox_uniform(draw_seed() if seed is None else seed, offset, (B, T), device=x.device)
        else:
            u = noise.detach()
        u = u.to(acc).clamp(NOISE_EPS, 1.0 - NOISE_EPS)
        ell = log(u) - log(1.0 - u)  # logistic noise
        s = sigmoid((ell + a) / const(beta))
    else:
        s = sigmoid(a)
    c = clamp_closed((zeta - gamma) * s + gamma, 0.0, 1.0)
    # z's forward value: 0 or 1, and NaN where c is NaN (a NaN logit or noise), as c + sg(h − c) computes it
    h = torch.where(torch.isnan(c), c, (c > const(threshold)).to(acc))
    # Straight-through estimator written as h + (c − sg(c)): the forward value is exactly h (c − c is
    # exactly 0), which c + sg(h − c) would only round to; the gradient w.r.t. c is 1 either way.
    z = h + (c - c.detach())

    q = sigmoid(a - beta * penalty_log_ratio(penalty, gamma, zeta, threshold))
    if lengths is None:
        # = q.mean(), whose backward would divide by a host scalar; an empty batch (B = 0) averages over no
        # step: 0, as with lengths all 0, not 0/0
        P = q.sum() / const(max(B * T, 1))
        denom = const(T)
        y = xs.to(acc) * z.t().unsqueeze(-1)  # (T, B, D)
    else:
        h = torch.where(valid, h, torch.zeros_like(h))
        z = torch.where(valid, z, torch.zeros_like(z))
        # where(), not a product with the mask: padding may hold anything (inf, NaN) and must neither
        # reach the result nor receive a gradient.
        P = torch.where(valid, q, torch.zeros_like(q)).sum() / valid.sum().clamp(min=1).to(acc)
        denom = lengths.to(device=x.device, dtype=acc).clamp(min=1).unsqueeze(1)  # (B, 1)
        y = torch.where(valid.t().unsqueeze(-1), xs.to(acc) * z.t().unsqueeze(-1), 0.0)

    if activation == "tanh":
        phi = torch.tanh(y)
    elif activation == "relu":
        phi = torch.relu(y)
    else:
        phi = y
    pooled = phi.sum(dim=0) / denom
    return PurifyGateOutput(pooled.to(x.dtype), P.to(logits.dtype), h.to(logits.dtype))


# ----------------------------------------------------------------------------------------------------
# SPEC §2: the KGS loss
# ----------------------------------------------------------------------------------------------------
class KGSRouting(NamedTuple):
    """Every routing decision of the KGS loss, all built from detached errors (no gradient).

    intra_k:    (M, B) bool, I: the masked branch is better and teaches the unmasked one.
    intra_u:    (M, B) bool, J: the unmasked branch is better and teaches the masked one.
    alpha:      (M, B) the Adjuster weights, Σ_m = M.
    teacher:    (B,) int64, -1 when the lowest error is tied.
    kd_T:       (B,) T_i = kd_scale·α[t(i), i] (meaningless where teacher = -1).
    kd_s:       (B,) the softmax temperature s_i (T_i with kd_divide_T, else 1).
    """

    intra_k: torch.Tensor
    intra_u: torch.Tensor
    alpha: torch.Tensor
    teacher: torch.Tensor
    kd_T: torch.Tensor
    kd_s: torch.Tensor


def kgs_routing(yk: torch.Tensor, yu: torch.Tensor, y: torch.Tensor, *, per_sample: bool = True,
                kd_scale: float = 10.0, kd_divide_T: bool = False, eps: float = 1e-12) -> KGSRouting:
    """Routing of SPEC §2 from (M, B) predictions and (B,) labels, computed on detached values.

    NaN errors compare false: a NaN error never makes a branch "better", and a sample with any NaN
    modality error has no teacher.
    """
    yk, yu, y = yk.detach(), yu.detach(), y.detach()
    M, B = yk.shape
    rk = (yk - y).abs()
    ru = (yu - y).abs()
    if not per_sample:  # the released code: decisions from batch-mean errors
        rk = rk.mean(dim=1, keepdim=True).expand(M, B)
        ru = ru.mean(dim=1, keepdim=True).expand(M, B)
    intra_k = rk < ru
    intra_u = rk > ru
    lam = rk / (rk.sum(dim=0, keepdim=True) + eps)
    inv = 1.0 / (1.0 + lam)
    alpha = M * inv / inv.sum(dim=0, keepdim=True)
    rmin = rk.min(dim=0).values  # NaN if any error of the sample is NaN
    is_min = rk == rmin.unsqueeze(0)
    has_teacher = is_min.sum(dim=0) == 1
    first_min = is_min.to(torch.int8).argmax(dim=0)
    teacher = torch.where(has_teacher, first_min, torch.full_like(first_min, -1))
    kd_T = kd_scale * alpha.gather(0, first_min.unsqueeze(0)).squeeze(0)
    kd_s = kd_T if kd_divide_T else torch.ones_like(kd_T)
    return KGSRouting(intra_k, intra_u, alpha, teacher, kd_T, kd_s)


def kgs_terms(yk: torch.Tensor, yu: torch.Tensor, y: torch.Tensor, h: torch.Tensor,
              routing: KGSRouting, *, yk_sg: Optional[torch.Tensor] = None,
              yu_sg: Optional[torch.Tensor] = None, h_sg: Optional[torch.Tensor] = None):
    """Per-sample terms (intra, inter, masked, unmasked), each (B,), for a fixed routing.

    ``*_sg`` are the stop-gradient copies (default: the detached inputs). Passing fixed values makes
    this a smooth function of (yk, yu, y, h), which is how the tests gradcheck the reference.
    """
    yk_sg = yk.detach() if yk_sg is None else yk_sg
    yu_sg = yu.detach() if yu_sg is None else yu_sg
    h_sg = h.detach() if h_sg is None else h_sg
    M, B, D = h.shape
    zero = yk.new_zeros(())
    # where(), not a product with the 0/1 mask: the unselected branch gets exactly zero gradient even
    # when it holds inf/NaN.
    intra = (torch.where(routing.intra_k, (yk_sg - yu) ** 2, zero)
             + torch.where(routing.intra_u, (yk - yu_sg) ** 2, zero)).sum(dim=0)

    has_teacher = routing.teacher >= 0
    t_idx = routing.teacher.clamp(min=0)
    s = routing.kd_s.to(h.dtype)
    h_teacher = h_sg.gather(0, t_idx.view(1, B, 1).expand(1, B, D)).squeeze(0)  # (B, D)
    log_p = torch.log_softmax(h_teacher / s.unsqueeze(1), dim=-1)
    student = has_teacher.unsqueeze(0) & (torch.arange(M, device=h.device).unsqueeze(1) != t_idx.unsqueeze(0))
    h_student = torch.where(student.unsqueeze(-1), h, h.new_zeros(()))
    log_q = torch.log_softmax(h_student / s.view(1, B, 1), dim=-1)
    kl = (log_p.exp().unsqueeze(0) * (log_p.unsqueeze(0) - log_q)).sum(dim=-1)  # (M, B)
    kl = torch.where(student, kl, h.new_zeros(()))
    inter = torch.where(has_teacher, 0.5 * routing.kd_T.to(h.dtype) ** 2 * kl.sum(dim=0), h.new_zeros(()))

    masked = (yk - y).abs().sum(dim=0)
    unmasked = (yu - y).abs().sum(dim=0)
    return intra, inter, masked, unmasked


def kgs_loss(
    yk: torch.Tensor,
    yu: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    *,
    per_sample: bool = True,
    kd_scale: float = 10.0,
    kd_divide_T: bool = False,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    reduction: str = "mean",
    eps: float = 1e-12,
) -> KGSLossOutput:
    """SPEC §2, eager. yk, yu (M, B); y (B,); h (M, B, D).

    The loss and terms are computed in float32 (float64 if any input is float64) and returned in the
    promoted dtype of the inputs; alpha likewise; teacher is int64.
    """
    out_dtype = torch.promote_types(torch.promote_types(yk.dtype, yu.dtype), torch.promote_types(y.dtype, h.dtype))
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    yk_, yu_, y_, h_ = yk.to(acc), yu.to(acc), y.to(acc), h.to(acc)
    routing = kgs_routing(yk_, yu_, y_, per_sample=per_sample, kd_scale=kd_scale, kd_divide_T=kd_divide_T, eps=eps)
    terms = kgs_terms(yk_, yu_, y_, h_, routing)
    w_intra, w_inter, w_masked, w_unmasked = (float(w) for w in weights)
    loss = w_intra * terms[0] + w_inter * terms[1] + w_masked * terms[2] + w_unmasked * terms[3]
    if reduction == "mean":  # over no sample (B = 0): 0, as the public op gives, not 0/0
        reduce = lambda v: v.mean() if v.numel() else v.sum()  # noqa: E731
    elif reduction == "sum":
        reduce = lambda v: v.sum()  # noqa: E731
    else:
        reduce = lambda v: v  # noqa: E731
    loss, intra, inter, masked, unmasked = (reduce(v).to(out_dtype) for v in (loss,) + tuple(terms))
    return KGSLossOutput(loss, intra, inter, masked, unmasked, routing.teacher, routing.alpha.to(out_dtype))


def kgs_heads(h_masked: torch.Tensor, h_unmasked: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """MIM's per-modality heads C_m = Linear(D, 1), shared by both branches: yk[m, i] =
    h_masked[m, i]·weight[m] + bias[m] and yu[m, i] = h_unmasked[m, i]·weight[m] + bias[m], (M, B) each.

    Computed in float32 (float64 if any input is float64) and rounded once to the promoted dtype of the
    four inputs, as a Linear in that dtype would.
    """
    pred_dtype = torch.promote_types(torch.promote_types(h_masked.dtype, h_unmasked.dtype),
                                     torch.promote_types(weight.dtype, bias.dtype))
    acc = torch.float64 if pred_dtype == torch.float64 else torch.float32
    w, b = weight.to(acc), bias.to(acc).unsqueeze(1)
    yk = torch.einsum("mbd,md->mb", h_masked.to(acc), w) + b
    yu = torch.einsum("mbd,md->mb", h_unmasked.to(acc), w) + b
    return yk.to(pred_dtype), yu.to(pred_dtype)


def kgs_loss_with_heads(h_masked: torch.Tensor, h_unmasked: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        y: torch.Tensor, **options) -> KGSLossOutput:
    """The composition the fused op implements: :func:`kgs_heads`, then :func:`kgs_loss` with
    h = h_masked (the purified representations are both the heads' input and the distillation's)."""
    yk, yu = kgs_heads(h_masked, h_unmasked, weight, bias)
    return kgs_loss(yk, yu, y, h_masked, **options)
