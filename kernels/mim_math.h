// The scalar math shared by the C++ CPU kernels (csrc/) and the CUDA kernels (kernels/*.cu).
//
// Everything here is a pure function of its arguments: no torch, no allocation, no globals, so the
// same code runs on the host and the device and the CPU tests cover the CUDA math.
#pragma once

#include <cstdint>

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

}  // namespace math
}  // namespace mim_fast
