// CUDA launcher of the fused counter-based dropout (csrc/dropout.cpp has the contract). Torch-free: raw
// pointers, sizes and a stream.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace mim_fast {
namespace cuda {

enum class DropoutType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct DropoutArgs {
  const void* x;           // contiguous, viewed as (outer, B, inner)
  void* y;                 // contiguous, x's shape and type
  DropoutType type;
  const int64_t* index;    // (B,) global sample indices
  int64_t outer, B, inner;
  int64_t blocks;          // ⌈outer·inner / 4⌉ Philox blocks per sample
  uint64_t key;            // the Philox key of the stream
  float p;                 // keep where u ≥ p
  float m;                 // the kept elements' factor, already rounded to x's type
};

// y[o, b, i] = x[o, b, i] · (u ≥ p ? m : 0), u = uniform(word j mod 4 of Philox(key, index[b]·blocks + ⌊j/4⌋)),
// j = o·inner + i.
// Bytes: x read once, y written once; one launch (grid-stride).
cudaError_t dropout_apply(const DropoutArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace mim_fast
