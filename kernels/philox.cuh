// CUDA launcher for the standalone Philox op (torch-free: raw pointers, sizes and a stream).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace mim_fast {
namespace cuda {

// out[i] = philox_uniform(seed, counters[i]) for i < n. Bytes: 8·n read, 4·n written; one launch.
cudaError_t philox_uniform(const int64_t* counters, float* out, int64_t n, uint64_t seed,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace mim_fast
