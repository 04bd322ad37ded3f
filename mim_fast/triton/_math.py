"""The shared float32 gate math of kernels/mim_math.h in Triton, operation for operation.

Kernels using these must be launched with ``enable_fp_fusion=False`` (no a*b+c → FMA contraction),
and divide with ``div_rn`` (IEEE rounding; Triton's ``/`` is approximate on GPUs), so the results are
bit-identical to the C++/CUDA kernels and the torch reference (mim_fast.reference.exp32 etc.).
"""
import triton
import triton.language as tl


@triton.jit
def exp32(x):
    t = x * 1.4426950216293335  # float32(log2 e) = 0x1.715476p+0
    kf = (t + 12582912.0) - 12582912.0  # round to nearest integer (1.5·2^23 trick)
    r = x - kf * 0.693359375
    r = r - kf * -0.00021219444170128554
    p = r * 0.00019841270113829523 + 0.0013888889225199819
    p = p * r + 0.008333333767950535
    p = p * r + 0.0416666679084301
    p = p * r + 0.1666666716337204
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    in_range = (x >= -87.0) & (x <= 88.0)
    k = tl.where(in_range, kf, 0.0).to(tl.int32)
    scaled = p * ((k + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(x < -87.0, 0.0, tl.where(x > 88.0, float("inf"), scaled))


@triton.jit
def log32(x):
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    hi = m > 1.4142135381698608  # float32(√2) = 0x1.6a09e6p+0
    m = tl.where(hi, m * 0.5, m)
    e = tl.where(hi, e + 1, e)
    f = m - 1.0
    s = tl.math.div_rn(f, 2.0 + f)
    w = s * s
    p = w * 0.09090909361839294 + 0.1111111119389534
    p = p * w + 0.1428571492433548
    p = p * w + 0.20000000298023224
    p = p * w + 0.3333333432674408
    log1p_f = (s + s) + (s + s) * (w * p)
    ef = e.to(tl.float32)
    r = ef * 0.693145751953125 + (log1p_f + ef * 1.428606765330187e-06)
    special = tl.where(x == 0.0, float("-inf"), tl.where(x == float("inf"), float("inf"), float("nan")))
    return tl.where((x > 0.0) & (x < float("inf")), r, special)


@triton.jit
def sigmoid32(x):
    return tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + exp32(-x))


@triton.jit
def tanh32(x):
    ax = tl.abs(x)
    x2 = x * x
    p = x2 * -0.0062876008450984955 + 0.021082019433379173
    p = p * x2 + -0.053855109959840775
    p = p * x2 + 0.13332617282867432
    p = p * x2 + -0.33333319425582886
    small = x + x * (x2 * p)
    big = 1.0 - tl.math.div_rn(tl.full(x.shape, 2.0, tl.float32), exp32(ax + ax) + 1.0)
    sign = x.to(tl.int32, bitcast=True) & -2147483648  # copysign(big, x) through the sign bit
    signed_big = (big.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(ax < 0.55, small, signed_big)
