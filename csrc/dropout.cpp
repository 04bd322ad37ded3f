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

// Rows r = o·B + b of `inner` contiguous elements each. A chunk's elements j0 … j0 + n − 1 (sample-local)
// take the words of blocks ⌊j0/4⌋ … ⌊(j0 + n − 1)/4⌋: those blocks are drawn into a buffer first, four
// words each in order (Philox vectorizes over the blocks), then applied.
template <typename scalar_t, typename acc_t>
MIM_ALWAYS_INLINE void dropout_rows_body(const DropoutRows<scalar_t>& a, int64_t r0, int64_t r1) {
  alignas(64) float words[kDropoutChunk + 8];
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
      for (int64_t k = 0; k < nblocks; ++k) {
        const uint64_t c = base + static_cast<uint64_t>(first + k);
        const math::Philox4 w = math::philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u,
                                                    k0, k1);
        for (int q = 0; q < 4; ++q) words[4 * k + q] = math::uint32_to_uniform(w.x[q]);
      }
      const float* __restrict__ u = words + (j0 - 4 * first);
      for (int64_t i = 0; i < n; ++i)
        dst[i0 + i] = static_cast<scalar_t>(static_cast<acc_t>(src[i0 + i]) * (u[i] >= a.p ? m : acc_t(0)));
    }
  }
}

MIM_ISA_VARIANTS((typename scalar_t, typename acc_t), (scalar_t, acc_t), dropout_rows,
                 (const DropoutRows<scalar_t>& a, int64_t r0, int64_t r1), (a, r0, r1))

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
