// The scalar math shared by the C++ CPU kernels (csrc/) and the CUDA kernels (kernels/*.cu).
//
// Everything here is a pure function of its arguments: no torch, no allocation, no globals, so the
// same code runs on the host and the device and the CPU tests cover the CUDA math.
//
// Floating-point contract: this header is compiled WITHOUT contraction of a*b+c into fused
// multiply-adds (setup.py passes -ffp-contract=off to the host compiler and --fmad=false to nvcc), and
// divisions are IEEE-rounded (nvcc's default -prec-div=true). Every float32 operation below is then one
// IEEE-rounded basic operation, so the gate functions give bit-identical results on the CPU, on the GPU,
// in the Triton kernels (mim_fast/triton/_math.py, launched with enable_fp_fusion=False) and in the torch
// reference (mim_fast/reference.py), which implement the same sequence of operations.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MIM_HD __host__ __device__ __forceinline__
#else
#define MIM_HD inline
#endif

namespace mim_fast {
namespace math {

// ---------------------------------------------------------------------------------------------------
// Counter-based noise: Philox4x32 with 10 rounds, bit-identical to Triton's tl.rand.
//
// Key: the 64-bit seed split into (lo, hi) 32-bit words. Counter: (lo, hi, 0, 0) of the 64-bit counter
// n = offset + linear_index. For n < 2^32 this is exactly tl.rand(seed, n); for larger n it matches
// Triton >= 3.8's tl.rand on int64 offsets (and our Triton kernels, which pass (lo, hi) explicitly so
// they do not depend on the Triton version). The first output word becomes a float in [0, 1).
// ---------------------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

MIM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct Philox4 {
  uint32_t x[4];
};

// One Philox4x32-10 block: counter (c0..c3), key (k0, k1).
MIM_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                             uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(kPhiloxRoundB, a2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, a0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * a2;
    c3 = kPhiloxRoundA * a0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Triton's uint_to_uniform_float for 32-bit words: reinterpret as int32, fold negatives with ~x
// (so the result is in [0, 2^31 - 1]), convert to float (round to nearest) and scale by the largest
// float s with (2^31 - 1) * s < 1, i.e. float(4.6566127342e-10) = 0x1.fffffep-32.
MIM_HD float uint32_to_uniform(uint32_t bits) {
  int32_t v = static_cast<int32_t>(bits);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * 0x1.fffffep-32f;
}

// u = tl.rand(seed, counter) for a 64-bit seed and counter; float32 in [0, 1).
MIM_HD float philox_uniform(uint64_t seed, uint64_t counter) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u,
                                  0u, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return uint32_to_uniform(r.x[0]);
}

// ---------------------------------------------------------------------------------------------------
// float32 exp / log / sigmoid / tanh from IEEE basic operations only.
//
// libm and CUDA's libdevice round their transcendental functions differently in the last bit; a gate
// decision 1[c > τ] taken on such a value could then differ between devices. These versions are
// accurate to a few ulp and, being sequences of +, −, ×, ÷ and bit moves, identical everywhere.
// float64 (CPU only) uses the C library: fp64 gates are not promised bit-identical across backends.
// ---------------------------------------------------------------------------------------------------
MIM_HD float bits_to_float(int32_t b) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

MIM_HD int32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// e^x: 0 below −87 (no subnormal results), +inf above 88, NaN for NaN. x = k·ln2 + r with k rounded
// to nearest by the 1.5·2^23 trick (exact for |x·log2e| < 2^22), ln2 split in two so k·ln2_hi is
// exact, then a degree-7 Taylor polynomial in |r| ≤ 0.35 and 2^k assembled in the exponent bits.
MIM_HD float exp32(float x) {
  const float kRound = 0x1.8p+23f;
  const float t = x * 0x1.715476p+0f;  // log2(e)
  const float kf = (t + kRound) - kRound;
  float r = x - kf * 0x1.63p-1f;       // ln2 high part (9 significant bits)
  r = r - kf * -0x1.bd0106p-13f;       // ln2 low part
  float p = 0x1.a01a02p-13f;           // 1/7!
  p = p * r + 0x1.6c16c2p-10f;         // 1/6!
  p = p * r + 0x1.111112p-7f;          // 1/5!
  p = p * r + 0x1.555556p-5f;          // 1/4!
  p = p * r + 0x1.555556p-3f;          // 1/3!
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const bool in_range = x >= -87.0f && x <= 88.0f;  // false for NaN too
  const int32_t k = static_cast<int32_t>(in_range ? kf : 0.0f);
  const float scaled = p * bits_to_float((k + 127) << 23);
  return x < -87.0f ? 0.0f : (x > 88.0f ? INFINITY : scaled);
}

// ln(x) for x > 0 (normal); −inf at 0, NaN below 0 or for NaN, +inf at +inf. x = m·2^e with m in
// [√½, √2); ln(m) = 2·atanh(s), s = (m − 1)/(m + 1), |s| ≤ 0.172, by its odd series to s^11.
MIM_HD float log32(float x) {
  const int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xFF) - 127;
  float m = bits_to_float((bits & 0x007FFFFF) | 0x3F800000);  // [1, 2)
  const bool hi = m > 0x1.6a09e6p+0f;                        // √2
  m = hi ? m * 0.5f : m;
  e = hi ? e + 1 : e;
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float w = s * s;
  float p = 0x1.745d18p-4f;            // 1/11
  p = p * w + 0x1.c71c72p-4f;          // 1/9
  p = p * w + 0x1.24924ap-3f;          // 1/7
  p = p * w + 0x1.99999ap-3f;          // 1/5
  p = p * w + 0x1.555556p-2f;          // 1/3
  const float log1p_f = (s + s) + (s + s) * (w * p);
  const float ef = static_cast<float>(e);
  const float r = ef * 0x1.62e4p-1f + (log1p_f + ef * 0x1.7f7d1cp-20f);
  // Special values (subnormals are not needed here: the gate's noise lies in [1e-6, 1 − 1e-6]).
  return x > 0.0f && x < INFINITY ? r : (x == 0.0f ? -INFINITY : (x == INFINITY ? INFINITY : NAN));
}

MIM_HD float sigmoid32(float x) { return 1.0f / (1.0f + exp32(-x)); }

// tanh: an odd polynomial below 0.55 (fitted, < 1 ulp), 1 − 2/(e^{2|x|} + 1) above (a few ulp).
MIM_HD float tanh32(float x) {
  const float ax = fabsf(x);
  const float x2 = x * x;
  float p = -0x1.9c1070p-8f;
  p = p * x2 + 0x1.596866p-6f;
  p = p * x2 + -0x1.b92e5ap-5f;
  p = p * x2 + 0x1.110d50p-3f;
  p = p * x2 + -0x1.55554cp-2f;
  const float small = x + x * (x2 * p);
  const float big = 1.0f - 2.0f / (exp32(ax + ax) + 1.0f);
  return ax < 0.55f ? small : copysignf(big, x);
}

// tanh for the CPU feature passes, where tanh32 was half of the forward's time and of the backward's
// at MIM's size: the [13/6] odd/even rational minimax fit that Eigen and XLA use for float tanh, on x
// clamped to ±7.90531110763549805 (where it reaches 1), and x itself below |x| < 0.0004. One division and
// 11 multiply-adds, no exponential and no branch to blend: 2.2× faster than tanh32 in the vectorized
// loops. Accurate to 6.9 ulp (relative error 4.1e-7; tanh32: 1.5 ulp), measured against double tanh
// over every finite float (tests/test_gate_math.py checks a sweep). tanh(±0) = ±0, tanh(±inf) = ±1
// to 7 ulp, NaN stays NaN. Only the pooled features and their gradients use it: no gate decision does.
MIM_HD float tanh_rational32(float x) {
  const float kClamp = 7.90531110763549805f;
  float xc = x > kClamp ? kClamp : x;  // NaN fails both tests and stays NaN
  xc = xc < -kClamp ? -kClamp : xc;
  const float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = xc * p;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const float r = p / q;
  return fabsf(x) < 0.0004f ? x : r;
}

template <typename T> MIM_HD T exp_(T x);
template <typename T> MIM_HD T log_(T x);
template <typename T> MIM_HD T tanh_(T x);
template <> MIM_HD float exp_<float>(float x) { return exp32(x); }
template <> MIM_HD float log_<float>(float x) { return log32(x); }
// The pooled features need no bit-identity (only the gate decisions do), so on the GPU tanh is CUDA's
// own tanhf (a few instructions, ≤ 2 ulp) rather than tanh32's IEEE division: the backward pass is
// close to compute-bound for 16-bit features. On the CPU it is tanh_rational32 (above): IEEE basic
// operations only, so the results are the same at every vector width.
template <> MIM_HD float tanh_<float>(float x) {
#if defined(__CUDA_ARCH__)
  return ::tanhf(x);
#else
  return tanh_rational32(x);
#endif
}
#if !defined(__CUDA_ARCH__)
template <> inline double exp_<double>(double x) { return std::exp(x); }
template <> inline double log_<double>(double x) { return std::log(x); }
template <> inline double tanh_<double>(double x) { return std::tanh(x); }
#endif
template <typename T> MIM_HD T sigmoid_(T x) { return T(1) / (T(1) + exp_<T>(-x)); }

// tanh'(y) = 1 − tanh²(y) = sech²(y). As 1 − th·th it is accurate to ~2 ulp of 1 in absolute terms only:
// where tanh(y) nears 1 (|y| ≳ 2) the subtraction cancels, and the few-ulp tanh_rational32 would leave
// ∂L/∂x there off by ~1e-3 relative (~1e-6 absolute; the fuzz tests caught it). On the CPU it is
// therefore 4e/(1 + e)² with e = e^{−2|y|}: relative accuracy within 5 ulp at every y (4.9 measured
// against double over every 7th float up to 48), for the cost of the tanh it replaces. The exponential
// is exp32's, specialised to arguments in [−87, 0] (one clamp instead of exp32's three range tests, and
// degree 6: |r| ≤ 0.35 needs no 1/7! term at this accuracy). Exactly 1 at y = 0; exactly 0 from
// |y| > 43 (as 1 − tanh² is 0 from |y| > 9, so ±inf features still give 0·inf = NaN where torch does);
// NaN for NaN. float64 and the GPU keep 1 − tanh².
MIM_HD float sech2_32(float y) {
  const float ay = fabsf(y);
  float v = -(ay + ay);
  v = v < -87.0f ? -87.0f : v;  // NaN fails the test and stays NaN
  const float kRound = 0x1.8p+23f;
  const float t = v * 0x1.715476p+0f;  // log2(e)
  const float kf = (t + kRound) - kRound;
  float r = v - kf * 0x1.63p-1f;       // ln2 high part
  r = r - kf * -0x1.bd0106p-13f;       // ln2 low part
  float p = 0x1.6c16c2p-10f;           // 1/6!
  p = p * r + 0x1.111112p-7f;
  p = p * r + 0x1.555556p-5f;
  p = p * r + 0x1.555556p-3f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t k = static_cast<int32_t>(kf);  // in [−126, 0] (NaN: any value; p is NaN then)
  const float e = p * bits_to_float((k + 127) << 23);
  const float d = 1.0f + e;
  const float s = (4.0f * e) / (d * d);
  return ay > 43.0f ? 0.0f : s;
}
template <typename T> MIM_HD T tanh_grad_(T y) {
  const T th = tanh_<T>(y);
  return T(1) - th * th;
}
#if !defined(__CUDA_ARCH__)
template <> MIM_HD float tanh_grad_<float>(float y) { return sech2_32(y); }
#endif

// ---------------------------------------------------------------------------------------------------
// SPEC §1: the purification gate at one step (b, t), and the activation φ with its derivative.
// ---------------------------------------------------------------------------------------------------
enum GateMode : int { kSample = 0, kExpected = 1 };
enum Activation : int { kTanh = 0, kRelu = 1, kIdentity = 2 };

// Hyper-parameters folded into the constants the kernels use, each computed in double on the host
// and rounded once to the compute type (as the torch reference does with its Python floats).
template <typename T>
struct GateParams {
  T loc_bias;     // a = g + loc_bias
  T beta;         // temperature β
  T zeta_gamma;   // ζ − γ
  T gamma;        // γ
  T threshold;    // τ
  T pen_shift;    // β·ln(−γ/ζ) ("mim") or β·ln((τ−γ)/(ζ−τ)) ("threshold")
  T noise_lo;     // 1e-6
  T noise_hi;     // 1 − 1e-6
  int mode;
};

template <typename T>
struct GateStep {
  T h;    // forward gate value z: exactly 0 or 1, NaN where c is NaN (a NaN logit or noise: SPEC's
          // z = c + sg(h − c) is then NaN, and so is every feature it multiplies)
  T ste;  // ∂c/∂g (straight-through: ∂z/∂c = 1): (ζ−γ)·s(1−s) (/β when sampling) where 0 ≤ s̄ ≤ 1;
          // −0.0 where the clamp is active (see ste_times), NaN where s is NaN
  T q;    // the penalty's per-step probability
};

// ∂L/∂g through the straight-through path, ste·∂L/∂c, where the clamp's indicator selects rather than
// multiplies (as torch.clamp's autograd does): a clamped step passes no gradient even when ∂L/∂c is NaN
// or inf (a NaN feature at a closed step), while a NaN gate (ste NaN) still gives NaN. The clamped steps
// are the ones whose ste is −0.0 exactly: (ζ−γ)·s(1−s) is never negative.
template <typename T>
MIM_HD T ste_times(T ste, T dc) {
  return (ste == T(0) && signbit(ste)) ? T(0) : ste * dc;
}

// g: the logit; u: the uniform noise (ignored in mode "expected").
template <typename T>
MIM_HD GateStep<T> gate_step(T g, T u, const GateParams<T>& p) {
  const T a = g + p.loc_bias;
  T s;
  if (p.mode == kSample) {
    u = u < p.noise_lo ? p.noise_lo : (u > p.noise_hi ? p.noise_hi : u);  // NaN stays NaN
    const T ell = log_<T>(u) - log_<T>(T(1) - u);
    s = sigmoid_<T>((ell + a) / p.beta);
  } else {
    s = sigmoid_<T>(a);
  }
  const T sbar = p.zeta_gamma * s + p.gamma;
  const T c = sbar < T(0) ? T(0) : (sbar > T(1) ? T(1) : sbar);  // NaN stays NaN
  GateStep<T> out;
  out.h = c != c ? c : (c > p.threshold ? T(1) : T(0));
  T ds = s * (T(1) - s);
  ds = p.mode == kSample ? ds / p.beta : ds;
  out.ste = (sbar >= T(0) && sbar <= T(1)) ? p.zeta_gamma * ds : (ds != ds ? ds : -T(0));
  out.q = sigmoid_<T>(a - p.pen_shift);
  return out;
}

// φ(x·0) and φ'(x·0), the values at a closed gate, without a transcendental: φ(±0) = ±0 and
// tanh'(±0) = 1 exactly, NaN (from x·0 with x = NaN or ±inf) stays NaN where φ or φ' propagates it
// (identity' is 1 regardless, relu'(NaN) = 1), so these equal activation(x·0) and
// activation_grad(x·0) bit for bit.
template <typename T>
MIM_HD T activation_closed(T x) {
  return x * T(0);
}

template <typename T>
MIM_HD T activation_grad_closed(T x, int act) {
  const T y = x * T(0);
  return act == kRelu ? (y != y ? T(1) : T(0)) : (act == kTanh ? T(1) + y : T(1));
}

template <typename T>
MIM_HD T activation(T y, int act) {
  return act == kTanh ? tanh_<T>(y) : (act == kRelu ? (y < T(0) ? T(0) : y) : y);  // relu(NaN) = NaN
}

// φ'(y) as PyTorch's autograd computes it: relu'(y) = 0 for y ≤ 0 (so relu'(0) = 0, relu'(NaN) = 1),
// tanh'(y) = 1 − tanh²(y) (tanh_grad_: sech² on the CPU, the same value more accurately).
template <typename T>
MIM_HD T activation_grad(T y, int act) {
  if (act == kTanh) return tanh_grad_<T>(y);
  return act == kRelu ? (y <= T(0) ? T(0) : T(1)) : T(1);
}

}  // namespace math
}  // namespace mim_fast
