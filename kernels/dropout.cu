// Fused counter-based dropout (contract: csrc/dropout.cpp): every thread draws the Philox uniforms of
// the elements it writes, so nothing but y is stored.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dropout.cuh"
#include "io.cuh"
#include "mim_math.h"

namespace mim_fast {
namespace cuda {
namespace {

template <typename T>
__global__ void dropout_kernel(DropoutArgs a) {
  const int64_t n = a.outer * a.B * a.inner;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ y = static_cast<T*>(a.y);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t i = e % a.inner, r = e / a.inner;
    const int64_t b = r % a.B, o = r / a.B;
    const int64_t j = o * a.inner + i;
    const uint64_t c = static_cast<uint64_t>(a.index[b]) * static_cast<uint64_t>(a.blocks) + static_cast<uint64_t>(j / 4);
    const math::Philox4 w = math::philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u,
                                                static_cast<uint32_t>(a.key), static_cast<uint32_t>(a.key >> 32));
    // word j mod 4, by selects (an indexed register array would spill to local memory); every thread
    // computes its element's block: the four neighbours recompute it, which a memory-bound kernel affords
    const int q = static_cast<int>(j & 3);
    const uint32_t bits = q == 0 ? w.x[0] : (q == 1 ? w.x[1] : (q == 2 ? w.x[2] : w.x[3]));
    const float u = math::uint32_to_uniform(bits);
    Io<T>::store(y + e, Io<T>::load(x + e) * (u >= a.p ? a.m : 0.0f));
  }
}

}  // namespace

cudaError_t dropout_apply(const DropoutArgs& a, cudaStream_t stream) {
  const int64_t n = a.outer * a.B * a.inner;
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);  // grid-stride beyond
  switch (a.type) {
    case DropoutType::kFloat32: dropout_kernel<float><<<grid, kThreads, 0, stream>>>(a); break;
    case DropoutType::kFloat16: dropout_kernel<__half><<<grid, kThreads, 0, stream>>>(a); break;
    default: dropout_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mim_fast
