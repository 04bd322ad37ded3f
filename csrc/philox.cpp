// mim_fast::philox_uniform(Tensor counters, int seed) -> Tensor
//
// out[i] = float32 uniform in [0, 1) from Philox4x32-10 keyed by `seed` at counter `counters[i]`:
// bit-identical to Triton's tl.rand(seed, counters[i]) and to mim_fast.reference.philox_uniform.
// CPU kernel here; the CUDA kernel is kernels/philox.cu, launched below when CUDA is compiled in.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "mim_math.h"

#if MIM_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "philox.cuh"
#endif

namespace mim_fast {
namespace {

void check_philox_args(const at::Tensor& counters, int64_t seed) {
  TORCH_CHECK(counters.scalar_type() == at::kLong, "mim_fast::philox_uniform: counters must be int64, got ",
              counters.scalar_type());
  TORCH_CHECK(seed >= 0, "mim_fast::philox_uniform: seed must be >= 0, got ", seed);
}

at::Tensor philox_uniform_cpu(const at::Tensor& counters, int64_t seed) {
  check_philox_args(counters, seed);
  const at::Tensor c = counters.contiguous();
  at::Tensor out = at::empty(c.sizes(), c.options().dtype(at::kFloat));
  const int64_t* src = c.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  const uint64_t key = static_cast<uint64_t>(seed);
  // Philox is ~100 integer ops per value: worth threads above a few thousand values.
  at::parallel_for(0, c.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dst[i] = math::philox_uniform(key, static_cast<uint64_t>(src[i]));
    }
  });
  return out;
}

#if MIM_FAST_WITH_CUDA
at::Tensor philox_uniform_cuda(const at::Tensor& counters, int64_t seed) {
  check_philox_args(counters, seed);
  const c10::cuda::CUDAGuard guard(counters.device());
  const at::Tensor c = counters.contiguous();
  at::Tensor out = at::empty(c.sizes(), c.options().dtype(at::kFloat));
  const cudaError_t err = cuda::philox_uniform(c.data_ptr<int64_t>(), out.data_ptr<float>(), c.numel(),
                                               static_cast<uint64_t>(seed),
                                               at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "mim_fast::philox_uniform: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(mim_fast, CPU, m) { m.impl("philox_uniform", &philox_uniform_cpu); }

#if MIM_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mim_fast, CUDA, m) { m.impl("philox_uniform", &philox_uniform_cuda); }
#endif

}  // namespace mim_fast
