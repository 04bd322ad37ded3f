// Load/store of a feature element of type T as float32, shared by the CUDA kernels: every kernel
// computes in float32 and reads/writes fp32, fp16 or bf16 memory (round-to-nearest-even on store).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mim_fast {
namespace cuda {

template <typename T> struct Io;
template <> struct Io<float> {
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};
template <> struct Io<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
};
template <> struct Io<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

}  // namespace cuda
}  // namespace mim_fast
