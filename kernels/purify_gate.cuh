// CUDA launchers of the fused purification gate (SPEC §1). Torch-free: raw pointers, sizes, strides
// and a stream; csrc/purify_gate.cpp converts tensors and calls these.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "mim_math.h"

namespace mim_fast {
namespace cuda {

enum class FeatureType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct GateForwardArgs {
  // x[t, b, d] at x + t·sT + b·sB + d·sD (elements), any strides; T, B, D >= 1.
  const void* x;
  FeatureType x_type;
  int64_t T, B, D, sT, sB, sD;
  const float* logits;     // (B, T) contiguous
  const float* noise;      // (B, T) contiguous, or null: draw philox_uniform(seed, offset + b·T + t)
  const int64_t* lengths;  // (B,) or null (all steps valid)
  uint64_t seed, offset;
  math::GateParams<float> params;
  int activation;  // math::Activation
  // outputs
  void* pooled;     // (B, D) contiguous, x's type
  float* gate;      // (B, T) 0/1
  float* ste;       // (B, T) ∂c/∂g, 0 at padding
  float* dq;        // (B, T) q(1−q), 0 at padding
  float* penalty;   // () Σ q / max(n_valid, 1)
  float* inv_count; // () 1 / max(n_valid, 1)
};

// Floats of scratch memory purify_gate_forward needs for these sizes (penalty partials, and partial
// pooled sums when the time axis is split across blocks).
int64_t purify_gate_forward_scratch(FeatureType x_type, int64_t B, int64_t T, int64_t D);

// Three or four launches: the gate (B·T threads), the penalty reduction, the pooling pass (reads x
// once), and — when T is split across blocks — the sum of the time chunks.
// Bytes: T·B·D·sizeof(x) read + B·D·sizeof(x) written + O(B·T) (+ 2·chunks·B·D·4 when T is split).
// lengths must lie in [0, T] (the glue clamps them). Fails with cudaErrorInvalidConfiguration when a
// grid would exceed 2^31 − 1 blocks.
cudaError_t purify_gate_forward(const GateForwardArgs& args, float* scratch, cudaStream_t stream);

struct GateBackwardArgs {
  const void* x;
  FeatureType x_type;
  int64_t T, B, D, sT, sB, sD;
  const void* grad_pooled;   // (B, D) contiguous, x's type
  const float* grad_penalty; // () on device
  const float* gate;         // (B, T)
  const float* ste;          // (B, T)
  const float* dq;           // (B, T)
  const float* inv_count;    // ()
  const int64_t* lengths;    // (B,) or null
  int activation;
  // outputs
  void* grad_x;  // written at grad_x + t·gT + b·gB + d·gD; null: ∂L/∂x not wanted (not computed)
  int64_t gT, gB, gD;
  float* dc_part;      // (n_dblocks, B, T) scratch: partial Σ_d over each feature block
  float* grad_logits;  // (B, T)
};

// Number of feature blocks the backward splits D into (the size of dc_part's first dimension).
int64_t purify_gate_backward_dblocks(FeatureType x_type, int64_t D);

// Two launches: the fused pass (reads x once, writes ∂L/∂x once, reduces ∂L/∂c over each feature
// block; one block per 64 time steps), then the combine ∂L/∂g = ste·Σ dc_part + ∂L/∂P·dq/n.
// Bytes: 2·T·B·D·sizeof(x) + O(B·D + B·T); T·B·D·sizeof(x) + O(B·D + B·T) when grad_x is null.
cudaError_t purify_gate_backward(const GateBackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace mim_fast
