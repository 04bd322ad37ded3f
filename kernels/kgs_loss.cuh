// CUDA launchers of the fused KGS loss (SPEC §2). Torch-free: raw pointers, sizes, strides, dtype tags
// and a stream; csrc/kgs_loss.cpp converts tensors and calls these. float32 accumulation throughout
// (float64 is a CPU-only feature).
#pragma once

#include <stdint.h>

#include <cuda_runtime_api.h>

namespace mim_fast {
namespace cuda {

enum class KgsDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct KgsForwardArgs {
  int64_t M, B, D;
  // yk[m, i] at yk + m·yk_sM + i·yk_sB (elements), likewise yu; y[i] at y + i·y_s; h[m, i, d] at
  // h + m·hM + i·hB + d·hD. Each tensor has its own dtype tag; the (M, B)-sized ones are read with a
  // run-time switch (cheap), h through a template.
  const void* yk;
  KgsDType yk_t;
  int64_t yk_sM, yk_sB;
  const void* yu;
  KgsDType yu_t;
  int64_t yu_sM, yu_sB;
  const void* y;
  KgsDType y_t;
  int64_t y_s;
  const void* h;
  KgsDType h_t;
  int64_t hM, hB, hD;
  bool per_sample;  // false: route every sample by the batch-mean errors (a first pass computes them)
  bool divide_T;
  int reduction;    // 0 "mean", 1 "sum", 2 "none"
  float kd_scale, eps;
  float scale;      // 1/B for "mean", else 1: folded into the saved gradients
  float w[4];       // w_intra, w_inter, w_masked, w_unmasked
  // outputs
  void* terms[5];   // loss, intra, inter, masked, unmasked: () or (B,) contiguous, dtype out_t
  KgsDType out_t;
  int64_t* teacher; // (B,)
  void* alpha;      // (M, B) contiguous, out_t
  float* grad_preds;  // (4, M, B) contiguous or null: r·J·2(yk−yu), r·I·2(yu−yk), r·sign(yk−y), r·sign(yu−y)
  void* grad_h;       // (M, B, D) contiguous, h_t, or null: r·½T²(q−p)/s for students, 0 elsewhere
  void* workspace;    // kgs_loss_forward_workspace_bytes(M, B, per_sample, reduction != none) bytes
};

int64_t kgs_loss_forward_workspace_bytes(int64_t M, int64_t B, bool per_sample, bool reduce);

// Forward. Launches: per_sample=True: one (plus a 4-byte cudaMemsetAsync of the completion counter
// when reducing to a scalar); per_sample=False: a one-block pass computing the 2M batch-mean errors
// (it also resets the counter), then the fused pass. Bytes: h read once (M·B·D), ∂inter/∂h written
// once when grad_h is set, O(M·B) for the rest. Deterministic: fixed work partition and summation order.
cudaError_t kgs_loss_forward(const KgsForwardArgs& args, cudaStream_t stream);

struct KgsBackwardArgs {
  int64_t M, B, D;
  const void* g[5];  // incoming gradients of loss, intra, inter, masked, unmasked; null = zero
  KgsDType g_t[5];
  int64_t g_s[5];    // element stride over samples (0 for a scalar)
  float w[4];
  const float* saved_preds;  // (4, M, B) or null
  const void* saved_h;       // (M, B, D) or null
  KgsDType h_t;
  void* grad_yk;  // (M, B), yk_t (null when saved_preds is)
  void* grad_yu;  // (M, B), yu_t
  void* grad_y;   // (B,), y_t
  KgsDType yk_t, yu_t, y_t;
  void* grad_h;   // (M, B, D), h_t (null when saved_h is)
};

// Backward, one launch: grad_h = c_inter·saved_h (reads and writes M·B·D once) and the prediction
// gradients from the saved (4, M, B) per-term gradients.
cudaError_t kgs_loss_backward(const KgsBackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace mim_fast
