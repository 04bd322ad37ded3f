// mim_fast::dropout_apply(Tensor x, Tensor index, int key, float p, int batch_dim) -> Tensor
//
// The fused kernel of counter-based dropout (mim_fast/ops/dropout.py): y = x · m with
//   m[e] = 1[u[e] ≥ p] · scale,   u[e] = uniform(word j mod 4 of Philox(key, index[b]·⌈S/4⌉ + ⌊j/4⌋))
// where b is e's coordinate along batch_dim, S = numel / B and j e's row-major position within its sample:
// one Philox block serves four elements. x is viewed as (outer, B, inner): j = o·inner + i. The uniforms are drawn where they are used — nothing
// x-sized but y is written (the composed version materialized counters, uniforms and the mask) — and the
// backward is this same op applied to the gradient. Bit-identical to the composed reference: u is
// float32 and compared with float32(p); scale is 1/(1 − p) rounded as torch rounds a Python float
// multiplied into a tensor of x's dtype (through float32 for float16/bfloat16); x·m is one multiply in
// x's dtype (in float32 then rounded, for float16/bfloat16), so NaN·0 is NaN, as torch's dropout.
// Bytes: x read once, y written once, index read; one pass. CPU kernel here, CUDA in kernels/dropout.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu_isa.h"
#include "mim_math.h"

#if MIM_ISA_DISPATCH
#include <immintrin.h>
#endif

#if MIM_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "dropout.cuh"
#endif

namespace mim_fast {
namespace {

struct DropoutShape {
  int64_t outer, B, inner, S;
  int64_t blocks;  // ⌈S/4⌉ Philox blocks per sample
};

DropoutShape check_dropout_args(const at::Tensor& x, const at::Tensor& index, int64_t key, double p, int64_t batch_dim) {
  TORCH_CHECK(x.dim() >= 1 && batch_dim >= 0 && batch_dim < x.dim(),
              "mim_fast::dropout_apply: batch_dim must index a dimension of x, got ", batch_dim, " for ", x.sizes());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == x.size(batch_dim) && index.scalar_type() == at::kLong,
              "mim_fast::dropout_apply: index must be int64 (B,) with B = x.size(batch_dim)");
  TORCH_CHECK(index.device() == x.device(), "mim_fast::dropout_apply: index must be on x's device");
  TORCH_CHECK(key >= 0, "mim_fast::dropout_apply: key must be >= 0");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "mim_fast::dropout_apply: p must lie in [0, 1]");
  DropoutShape s{1, x.size(batch_dim), 1, 0, 0};
  for (int64_t d = 0; d < batch_dim; ++d) s.outer *= x.size(d);
  for (int64_t d = batch_dim + 1; d < x.dim(); ++d) s.inner *= x.size(d);
  s.S = s.outer * s.inner;
  s.blocks = (s.S + 3) / 4;
  return s;
}

// scale rounded to x's dtype as torch rounds mask * python_float: via float32 for the 16-bit types.
template <typename scalar_t>
scalar_t dropout_scale(double p) {
  const double scale = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
  if (std::is_same<scalar_t, double>::value) return static_cast<scalar_t>(scale);
  return static_cast<scalar_t>(static_cast<float>(scale));
}

template <typename scalar_t>
struct DropoutRows {
  const scalar_t* x;
  scalar_t* y;
  const int64_t* index;
  uint64_t key;
  float p;        // compared with u in float32
  scalar_t m;     // the kept elements' factor, in x's dtype
  DropoutShape s;
};

constexpr int64_t kDropoutChunk = 256;  // elements; a multiple of 4
constexpr int64_t kBlockGroup = 8;      // blocks drawn per group (the AVX2 path draws 8 side by side)
// n ≤ kDropoutChunk elements span at most kDropoutChunk/4 + 1 blocks, rounded up to whole groups
constexpr int64_t kWords = 4 * ((kDropoutChunk / 4 + 1 + kBlockGroup - 1) / kBlockGroup) * kBlockGroup;

// words[4·k + q] = the uniform of word q of Philox block c + k, k < nblocks: one block at a time (the
// baseline ISA; the compiler leaves Philox's 32×32→64 multiplies scalar, ~10 cycles an element).
MIM_ALWAYS_INLINE void draw_blocks_scalar(uint64_t c, int64_t nblocks, uint32_t k0, uint32_t k1, float* words) {
  for (int64_t k = 0; k < nblocks; ++k) {
    const uint64_t n = c + static_cast<uint64_t>(k);
    const math::Philox4 w = math::philox4x32_10(static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), 0u, 0u,
                                                k0, k1);
    for (int q = 0; q < 4; ++q) words[4 * k + q] = math::uint32_to_uniform(w.x[q]);
  }
}

#if MIM_ISA_DISPATCH
// mulhi32 of 8 lanes (b: the same value in every lane)
__attribute__((target("avx2"), always_inline)) inline __m256i mulhi_avx2(__m256i a, __m256i b, __m256i hi_mask) {
  const __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(a, b), 32);  // lanes 0, 2, 4, 6: high halves, moved low
  const __m256i odd = _mm256_and_si256(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), b), hi_mask);  // 1, 3, 5, 7
  return _mm256_or_si256(even, odd);
}

// uint32_to_uniform of 8 lanes
__attribute__((target("avx2"), always_inline)) inline __m256 uniform_avx2(__m256 scale, __m256i w) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_xor_si256(w, _mm256_srai_epi32(w, 31))), scale);
}

// The same words, 8 blocks side by side in AVX2 registers (whole groups of 8: up to 7 blocks past
// nblocks are drawn into the buffer and not used). Bit for bit math::philox4x32_10 and
// math::uint32_to_uniform: integer operations are exact; mulhi32 is the high half of _mm256_mul_epu32's
// 64-bit products; ~x for negative x is x ^ (x >> 31); the int32 → float conversion rounds to nearest (as
// the scalar cast does) and the scale is the same float multiply. Not inlined: a target("avx2") function
// cannot be inlined into the baseline template it is called from; one call draws a whole chunk.
__attribute__((target("avx2"))) void draw_blocks_avx2(uint64_t c, int64_t nblocks, uint32_t k0, uint32_t k1,
                                                      float* words) {
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256i low_high = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // 32-bit words: low halves, then high
  const __m256i four = _mm256_set1_epi64x(4);
  const __m256i ra = _mm256_set1_epi32(static_cast<int>(math::kPhiloxRoundA));
  const __m256i rb = _mm256_set1_epi32(static_cast<int>(math::kPhiloxRoundB));
  const __m256i hi_mask = _mm256_set1_epi64x(static_cast<int64_t>(0xFFFFFFFF00000000ull));
  const __m256 scale = _mm256_set1_ps(0x1.fffffep-32f);
  for (int64_t k = 0; k < nblocks; k += kBlockGroup) {
    // the 8 counters c + k + l as 64-bit lanes, split into 32-bit words: lo in c0, hi in c1
    const __m256i base = _mm256_set1_epi64x(static_cast<int64_t>(c + static_cast<uint64_t>(k)));
    const __m256i n03 = _mm256_add_epi64(base, lane), n47 = _mm256_add_epi64(n03, four);
    const __m256i p03 = _mm256_permutevar8x32_epi32(n03, low_high), p47 = _mm256_permutevar8x32_epi32(n47, low_high);
    __m256i c0 = _mm256_permute2x128_si256(p03, p47, 0x20);  // low words of counters 0..7
    __m256i c1 = _mm256_permute2x128_si256(p03, p47, 0x31);  // high words
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t ka = k0, kb = k1;
    for (int r = 0; r < math::kPhiloxRounds; ++r) {
      const __m256i a0 = c0, a2 = c2;
      c0 = _mm256_xor_si256(_mm256_xor_si256(mulhi_avx2(a2, rb, hi_mask), c1), _mm256_set1_epi32(static_cast<int>(ka)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(mulhi_avx2(a0, ra, hi_mask), c3), _mm256_set1_epi32(static_cast<int>(kb)));
      c1 = _mm256_mullo_epi32(a2, rb);
      c3 = _mm256_mullo_epi32(a0, ra);
      ka += math::kPhiloxKeyA;
      kb += math::kPhiloxKeyB;
    }
    // transpose (word q of block l) to words[4·l + q]
    const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
    const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);  // blocks 0|4, 1|5
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);  // blocks 2|6, 3|7
    float* out = words + 4 * k;
    _mm256_store_ps(out, uniform_avx2(scale, _mm256_permute2x128_si256(u0, u1, 0x20)));       // blocks 0, 1
    _mm256_store_ps(out + 8, uniform_avx2(scale, _mm256_permute2x128_si256(u2, u3, 0x20)));   // blocks 2, 3
    _mm256_store_ps(out + 16, uniform_avx2(scale, _mm256_permute2x128_si256(u0, u1, 0x31)));  // blocks 4, 5
    _mm256_store_ps(out + 24, uniform_avx2(scale, _mm256_permute2x128_si256(u2, u3, 0x31)));  // blocks 6, 7
  }
}
#endif

// Rows r = o·B + b of `inner` contiguous elements each. A chunk's elements j0 … j0 + n − 1 (sample-local)
// take the words of blocks ⌊j0/4⌋ … ⌊(j0 + n − 1)/4⌋: those blocks are drawn into a buffer first, four
// words each in order, then applied. kVector: draw them with AVX2 (the avx2 and avx512 variants).
template <typename scalar_t, typename acc_t, bool kVector>
MIM_ALWAYS_INLINE void dropout_rows_body(const DropoutRows<scalar_t>& a, int64_t r0, int64_t r1) {
  alignas(64) float words[kWords];
  const acc_t m = static_cast<acc_t>(a.m);
  const uint32_t k0 = static_cast<uint32_t>(a.key), k1 = static_cast<uint32_t>(a.key >> 32);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r / a.s.B, b = r % a.s.B;
    const uint64_t base = static_cast<uint64_t>(a.index[b]) * static_cast<uint64_t>(a.s.blocks);
    const scalar_t* __restrict__ src = a.x + r * a.s.inner;
    scalar_t* __restrict__ dst = a.y + r * a.s.inner;
    for (int64_t i0 = 0; i0 < a.s.inner; i0 += kDropoutChunk) {
      const int64_t n = std::min(kDropoutChunk, a.s.inner - i0);
      const int64_t j0 = o * a.s.inner + i0;
      const int64_t first = j0 / 4, nblocks = (j0 + n - 1) / 4 - first + 1;
#if MIM_ISA_DISPATCH
      if constexpr (kVector) {
        draw_blocks_avx2(base + static_cast<uint64_t>(first), nblocks, k0, k1, words);
      } else {
        draw_blocks_scalar(base + static_cast<uint64_t>(first), nblocks, k0, k1, words);
      }
#else
      draw_blocks_scalar(base + static_cast<uint64_t>(first), nblocks, k0, k1, words);
#endif
      const float* __restrict__ u = words + (j0 - 4 * first);
      for (int64_t i = 0; i < n; ++i)
        dst[i0 + i] = static_cast<scalar_t>(static_cast<acc_t>(src[i0 + i]) * (u[i] >= a.p ? m : acc_t(0)));
    }
  }
}

// The variants per ISA (as MIM_ISA_VARIANTS makes them, with the AVX2 Philox in the wider two).
template <typename scalar_t, typename acc_t>
void dropout_rows_default(const DropoutRows<scalar_t>& a, int64_t r0, int64_t r1) {
  dropout_rows_body<scalar_t, acc_t, false>(a, r0, r1);
}
#if MIM_ISA_DISPATCH
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2"))) void dropout_rows_avx2(const DropoutRows<scalar_t>& a, int64_t r0, int64_t r1) {
  dropout_rows_body<scalar_t, acc_t, true>(a, r0, r1);
}
template <typename scalar_t, typename acc_t>
__attribute__((target("avx512f"))) void dropout_rows_avx512(const DropoutRows<scalar_t>& a, int64_t r0, int64_t r1) {
  dropout_rows_body<scalar_t, acc_t, true>(a, r0, r1);
}
#endif
template <typename scalar_t, typename acc_t>
void dropout_rows(Isa isa, const DropoutRows<scalar_t>& a, int64_t r0, int64_t r1) {
  MIM_ISA_SWITCH((scalar_t, acc_t), dropout_rows, (a, r0, r1))
  dropout_rows_default<scalar_t, acc_t>(a, r0, r1);
}

at::Tensor dropout_apply_cpu(const at::Tensor& x, const at::Tensor& index, int64_t key, double p, int64_t batch_dim) {
  const DropoutShape s = check_dropout_args(x, index, key, p, batch_dim);
  const at::Tensor xc = x.contiguous();
  const at::Tensor idx = index.contiguous();
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  if (xc.numel() == 0) return y;
  const Isa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_apply_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const DropoutRows<scalar_t> a{xc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
                                  static_cast<uint64_t>(key), static_cast<float>(p), dropout_scale<scalar_t>(p), s};
    // Philox is ~100 integer operations an element: threads from ~16K elements.
    const int64_t rows = s.outer * s.B;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, s.inner));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { dropout_rows<scalar_t, acc_t>(isa, a, r0, r1); });
  });
  return y;
}

#if MIM_FAST_WITH_CUDA
at::Tensor dropout_apply_cuda(const at::Tensor& x, const at::Tensor& index, int64_t key, double p, int64_t batch_dim) {
  const DropoutShape s = check_dropout_args(x, index, key, p, batch_dim);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor idx = index.contiguous();
  at::Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
  if (xc.numel() == 0) return y;
  cuda::DropoutArgs a{};
  a.x = xc.data_ptr();
  a.y = y.data_ptr();
  a.index = idx.data_ptr<int64_t>();
  a.outer = s.outer; a.B = s.B; a.inner = s.inner; a.blocks = s.blocks;
  a.key = static_cast<uint64_t>(key);
  a.p = static_cast<float>(p);
  switch (x.scalar_type()) {
    case at::kFloat: a.type = cuda::DropoutType::kFloat32; a.m = dropout_scale<float>(p); break;
    case at::kHalf: a.type = cuda::DropoutType::kFloat16; a.m = static_cast<float>(dropout_scale<at::Half>(p)); break;
    case at::kBFloat16:
      a.type = cuda::DropoutType::kBFloat16; a.m = static_cast<float>(dropout_scale<at::BFloat16>(p)); break;
    default: TORCH_CHECK(false, "mim_fast::dropout_apply: the CUDA kernel takes float16, bfloat16 or float32, got ",
                         x.scalar_type());
  }
  const cudaError_t err = cuda::dropout_apply(a, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "mim_fast::dropout_apply: CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(mim_fast, CPU, m) { m.impl("dropout_apply", &dropout_apply_cpu); }

#if MIM_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mim_fast, CUDA, m) { m.impl("dropout_apply", &dropout_apply_cuda); }
#endif

}  // namespace mim_fast
