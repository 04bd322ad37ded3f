#include "philox.cuh"

#include "mim_math.h"

namespace mim_fast {
namespace cuda {
namespace {

__global__ void philox_uniform_kernel(const int64_t* __restrict__ counters, float* __restrict__ out,
                                      int64_t n, uint64_t seed) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = math::philox_uniform(seed, static_cast<uint64_t>(counters[i]));
  }
}

}  // namespace

cudaError_t philox_uniform(const int64_t* counters, float* out, int64_t n, uint64_t seed,
                           cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  // Grid-stride loop: cap the grid so huge n never overflows gridDim.x.
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  philox_uniform_kernel<<<grid, kThreads, 0, stream>>>(counters, out, n, seed);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace mim_fast
