// CUDA kernels of the fused KGS loss (SPEC §2). See kgs_loss.cuh for the contract.
//
// Layout: one warp per sample (lanes stride over the D features), kWarps samples per block, a fixed
// grid of at most kMaxBlocks blocks striding over the samples. A warp computes its sample's routing
// (every lane scans the M modalities in order — the (M, B)-sized loads are warp broadcasts — so all
// lanes agree without communication), then the softmax statistics of the teacher row and of each
// student row with an online log-sum-exp merged by shuffles, then the KL pass, which re-reads the two
// rows (from L1/L2: a sample's M·D values were just loaded) and writes ∂inter/∂h. Reductions over
// lanes, warps and blocks have a fixed shape, so results are run-to-run deterministic; the scalar
// reductions ("mean"/"sum") finish in the last block to arrive (per-block partials + a counter).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "io.cuh"
#include "kgs_loss.cuh"
#include "kgs_math.h"

namespace mim_fast {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int64_t kMaxBlocks = 1024;  // fixed (device-independent) so the summation order is too
constexpr int kMeansThreads = 1024;

// Io<T>: kernels/io.cuh

__device__ __forceinline__ float load_any(const void* p, KgsDType t, int64_t idx) {
  switch (t) {
    case KgsDType::kFloat32: return Io<float>::load(static_cast<const float*>(p) + idx);
    case KgsDType::kFloat16: return Io<__half>::load(static_cast<const __half*>(p) + idx);
    default: return Io<__nv_bfloat16>::load(static_cast<const __nv_bfloat16*>(p) + idx);
  }
}

__device__ __forceinline__ void store_any(void* p, KgsDType t, int64_t idx, float v) {
  switch (t) {
    case KgsDType::kFloat32: Io<float>::store(static_cast<float*>(p) + idx, v); break;
    case KgsDType::kFloat16: Io<__half>::store(static_cast<__half*>(p) + idx, v); break;
    default: Io<__nv_bfloat16>::store(static_cast<__nv_bfloat16*>(p) + idx, v); break;
  }
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // a butterfly of commutative adds: every lane holds the same bits
}

// Deterministic block sum (fixed tree); every thread gets the result. scratch: one V per warp.
template <typename V>
__device__ V block_sum(V v, V* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  V total = V(0);
  for (int w = 0; w < nwarps; ++w) total += scratch[w];
  return total;
}

struct Workspace {
  double* partials;        // (kMaxBlocks, 5) per-block sums of the terms
  float* means;            // (2M,) batch-mean errors rk then ru
  unsigned int* counter;   // blocks finished
};

int64_t forward_blocks(int64_t B) {
  const int64_t need = (B + kWarps - 1) / kWarps;
  return need < kMaxBlocks ? need : kMaxBlocks;
}

Workspace carve(void* base, int64_t M, int64_t B, bool per_sample, bool reduce) {
  char* p = static_cast<char*>(base);
  Workspace w{};
  if (reduce) {
    w.partials = reinterpret_cast<double*>(p);
    p += forward_blocks(B) * 5 * sizeof(double);
  }
  if (!per_sample) {
    w.means = reinterpret_cast<float*>(p);
    p += 2 * M * sizeof(float);
  }
  if (reduce) w.counter = reinterpret_cast<unsigned int*>(p);
  return w;
}

// ---------------------------------------------------------------------------------------------------
// per_sample=False: the batch means of |yk − y| and |yu − y| per modality (one block; float errors
// summed in double in a fixed tree). Also resets the forward's completion counter.
// ---------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kMeansThreads) batch_means_kernel(KgsForwardArgs a, Workspace ws) {
  __shared__ double scratch[kMeansThreads / 32];
  for (int64_t m = 0; m < a.M; ++m) {
    double sk = 0.0, su = 0.0;
    for (int64_t i = threadIdx.x; i < a.B; i += blockDim.x) {
      const float yi = load_any(a.y, a.y_t, i * a.y_s);
      sk += static_cast<double>(fabsf(load_any(a.yk, a.yk_t, m * a.yk_sM + i * a.yk_sB) - yi));
      su += static_cast<double>(fabsf(load_any(a.yu, a.yu_t, m * a.yu_sM + i * a.yu_sB) - yi));
    }
    sk = block_sum(sk, scratch);
    su = block_sum(su, scratch);
    if (threadIdx.x == 0) {
      ws.means[m] = static_cast<float>(sk / static_cast<double>(a.B));
      ws.means[a.M + m] = static_cast<float>(su / static_cast<double>(a.B));
    }
  }
  if (threadIdx.x == 0 && ws.counter) *ws.counter = 0u;
}

// Softmax statistics (max, log Σ exp(x − max)) of one h row, x = h·inv_s, over the warp.
template <typename T>
__device__ __forceinline__ void row_stats(const T* row, int64_t hD, int64_t D, float inv_s, int lane, float& mx,
                                          float& log_sum) {
  float m = -INFINITY, s = 0.0f;
  for (int64_t d = lane; d < D; d += 32) kgs::softmax_add<float>(m, s, Io<T>::load(row + d * hD) * inv_s);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    kgs::softmax_merge<float>(m, s, m2, s2);  // symmetric: every lane ends with the same state
  }
  mx = m;
  log_sum = math::log_<float>(s);
}

template <typename T>
__device__ __forceinline__ void zero_row(T* row, int64_t D, int lane) {
  for (int64_t d = lane; d < D; d += 32) Io<T>::store(row + d, 0.0f);
}

// Error of modality m of sample i as the routing sees it: its own (per_sample) or the batch mean.
struct Errors {
  float yk, yu, ek, eu, rk, ru;
};

__device__ __forceinline__ Errors errors_of(const KgsForwardArgs& a, const Workspace& ws, int64_t m, int64_t i,
                                            float yi) {
  Errors e;
  e.yk = load_any(a.yk, a.yk_t, m * a.yk_sM + i * a.yk_sB);
  e.yu = load_any(a.yu, a.yu_t, m * a.yu_sM + i * a.yu_sB);
  e.ek = fabsf(e.yk - yi);
  e.eu = fabsf(e.yu - yi);
  e.rk = a.per_sample ? e.ek : ws.means[m];
  e.ru = a.per_sample ? e.eu : ws.means[a.M + m];
  return e;
}

template <typename T, bool kGradH>
__global__ void __launch_bounds__(kThreads) kgs_forward_kernel(KgsForwardArgs a, Workspace ws) {
  __shared__ double warp_terms[kWarps][5];
  __shared__ double scratch[kWarps];
  __shared__ bool is_last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t M = a.M, B = a.B, D = a.D;
  const T* h = static_cast<const T*>(a.h);
  T* gh = static_cast<T*>(a.grad_h);
  const bool reduce = a.reduction != 2;
  double total[5] = {0.0, 0.0, 0.0, 0.0, 0.0};

  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + warp; i < B;
       i += static_cast<int64_t>(gridDim.x) * kWarps) {
    const float yi = load_any(a.y, a.y_t, i * a.y_s);
    float intra = 0.0f, masked = 0.0f, unmasked = 0.0f, sum_rk = 0.0f;
    kgs::TeacherScan<float> scan = kgs::TeacherScan<float>::empty();
    for (int64_t m = 0; m < M; ++m) {
      const Errors e = errors_of(a, ws, m, i, yi);
      masked += e.ek;
      unmasked += e.eu;
      sum_rk += e.rk;
      scan.add(e.rk, m);
      const kgs::IntraTerm<float> it = kgs::intra_term<float>(e.yk, e.yu, kgs::intra_direction<float>(e.rk, e.ru), a.scale);
      intra += it.value;
      if (a.grad_preds != nullptr && m % 32 == lane) {
        a.grad_preds[(0 * M + m) * B + i] = it.d_yk;
        a.grad_preds[(1 * M + m) * B + i] = it.d_yu;
        a.grad_preds[(2 * M + m) * B + i] = a.scale * kgs::sign0<float>(e.yk - yi);
        a.grad_preds[(3 * M + m) * B + i] = a.scale * kgs::sign0<float>(e.yu - yi);
      }
    }
    float sum_inv = 0.0f;
    for (int64_t m = 0; m < M; ++m) sum_inv += kgs::adjuster_inv<float>(errors_of(a, ws, m, i, yi).rk, sum_rk, a.eps);
    const int64_t t = scan.teacher();
    float alpha_t = 0.0f;
    for (int64_t m = 0; m < M; ++m) {
      const float inv = kgs::adjuster_inv<float>(errors_of(a, ws, m, i, yi).rk, sum_rk, a.eps);
      const float alpha = kgs::adjuster_alpha<float>(inv, sum_inv, M);
      if (m % 32 == lane) store_any(a.alpha, a.out_t, m * B + i, alpha);
      if (m == t) alpha_t = alpha;
    }
    if (lane == 0) a.teacher[i] = t;

    float inter = 0.0f;
    if (t >= 0) {
      const kgs::Distill<float> c = kgs::distill_constants<float>(a.kd_scale, alpha_t, a.divide_T, a.scale);
      const T* row_t = h + t * a.hM + i * a.hB;
      float mx_t, ls_t;
      row_stats<T>(row_t, a.hD, D, c.inv_s, lane, mx_t, ls_t);
      float kl = 0.0f;
      for (int64_t m = 0; m < M; ++m) {
        if (m == t) {
          if (kGradH) zero_row<T>(gh + (m * B + i) * D, D, lane);  // the teacher learns nothing
          continue;
        }
        const T* row_m = h + m * a.hM + i * a.hB;
        float mx_m, ls_m;
        row_stats<T>(row_m, a.hD, D, c.inv_s, lane, mx_m, ls_m);
        T* grow = kGradH ? gh + (m * B + i) * D : nullptr;
        for (int64_t d = lane; d < D; d += 32) {
          const float zt = Io<T>::load(row_t + d * a.hD) * c.inv_s - mx_t;
          const float zm = Io<T>::load(row_m + d * a.hD) * c.inv_s - mx_m;
          const kgs::KLElement<float> e = kgs::kl_element<float>(zt, ls_t, zm, ls_m);
          kl += e.kl;
          if (kGradH) Io<T>::store(grow + d, c.grad_coef * e.q_minus_p);
        }
      }
      inter = c.half_T2 * warp_sum(kl);
    } else if (kGradH) {  // no teacher: nothing is distilled and h is not read
      for (int64_t m = 0; m < M; ++m) zero_row<T>(gh + (m * B + i) * D, D, lane);
    }
    if (lane == 0) {
      const float vals[5] = {kgs::weighted_loss<float>(a.w, intra, inter, masked, unmasked), intra, inter, masked,
                             unmasked};
      if (reduce) {
        for (int k = 0; k < 5; ++k) total[k] += static_cast<double>(vals[k]);
      } else {
        for (int k = 0; k < 5; ++k) store_any(a.terms[k], a.out_t, i, vals[k]);
      }
    }
  }
  if (!reduce) return;

  // Per-block partial sums (warps in order), then the last block to finish sums the partials.
  if (lane == 0) {
    for (int k = 0; k < 5; ++k) warp_terms[warp][k] = total[k];
  }
  __syncthreads();
  if (threadIdx.x < 5) {
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += warp_terms[w][threadIdx.x];
    ws.partials[blockIdx.x * 5 + threadIdx.x] = s;
  }
  __threadfence();  // the partials are visible device-wide before the counter says so
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(ws.counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int k = 0; k < 5; ++k) {
    double s = 0.0;
    for (int64_t b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
      s += *static_cast<volatile double*>(ws.partials + b * 5 + k);  // written by other blocks: bypass L1
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
      if (a.reduction == 0) s /= static_cast<double>(B);
      store_any(a.terms[k], a.out_t, 0, static_cast<float>(s));
    }
  }
}

template <typename T>
cudaError_t launch_forward(const KgsForwardArgs& a, cudaStream_t stream) {
  const bool reduce = a.reduction != 2;
  const Workspace ws = carve(a.workspace, a.M, a.B, a.per_sample, reduce);
  if (!a.per_sample) {
    batch_means_kernel<<<1, kMeansThreads, 0, stream>>>(a, ws);
  } else if (reduce) {
    const cudaError_t err = cudaMemsetAsync(ws.counter, 0, sizeof(unsigned int), stream);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(forward_blocks(a.B)));
  if (a.grad_h != nullptr) {
    kgs_forward_kernel<T, true><<<grid, kThreads, 0, stream>>>(a, ws);
  } else {
    kgs_forward_kernel<T, false><<<grid, kThreads, 0, stream>>>(a, ws);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ float chain(const KgsBackwardArgs& a, int term, int64_t i) {
  const float gl = a.g[0] ? load_any(a.g[0], a.g_t[0], i * a.g_s[0]) : 0.0f;
  const float gt = a.g[term] ? load_any(a.g[term], a.g_t[term], i * a.g_s[term]) : 0.0f;
  return kgs::chain_factor<float>(gt, a.w[term - 1], gl);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) kgs_backward_kernel(KgsBackwardArgs a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t M = a.M, B = a.B, D = a.D;
  if (a.grad_h != nullptr) {  // one warp per (m, i) row of ∂L/∂h
    const T* src = static_cast<const T*>(a.saved_h);
    T* dst = static_cast<T*>(a.grad_h);
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp; r < M * B;
         r += static_cast<int64_t>(gridDim.x) * kWarps) {
      const float c = chain(a, 2, r % B);
      for (int64_t d = lane; d < D; d += 32) Io<T>::store(dst + r * D + d, c * Io<T>::load(src + r * D + d));
    }
  }
  if (a.saved_preds != nullptr) {  // one thread per sample
    const float* s = a.saved_preds;
    // The intra term's saved gradients can be NaN without a transfer (kgs_math.h intra_term); like the
    // reference, they count only when a gradient reached the intra term (directly or through the loss).
    const bool intra_reached = a.g[1] != nullptr || a.g[0] != nullptr;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < B;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const float c_intra = chain(a, 1, i), c_masked = chain(a, 3, i), c_unmasked = chain(a, 4, i);
      float sk = 0.0f, su = 0.0f;
      for (int64_t m = 0; m < M; ++m) {
        const float ik = intra_reached ? s[(0 * M + m) * B + i] : 0.0f;
        const float iu = intra_reached ? s[(1 * M + m) * B + i] : 0.0f;
        const float mk = s[(2 * M + m) * B + i], mu = s[(3 * M + m) * B + i];
        store_any(a.grad_yk, a.yk_t, m * B + i, c_intra * ik + c_masked * mk);
        store_any(a.grad_yu, a.yu_t, m * B + i, c_intra * iu + c_unmasked * mu);
        sk += mk;
        su += mu;
      }
      store_any(a.grad_y, a.y_t, i, -(c_masked * sk + c_unmasked * su));
    }
  }
}

template <typename T>
cudaError_t launch_backward(const KgsBackwardArgs& a, cudaStream_t stream) {
  const int64_t rows = a.grad_h != nullptr ? a.M * a.B : 0;
  const int64_t by_rows = (rows + kWarps - 1) / kWarps;
  const int64_t by_samples = (a.B + kThreads - 1) / kThreads;
  int64_t blocks = by_rows > by_samples ? by_rows : by_samples;
  blocks = blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535;  // grid-stride beyond
  kgs_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int64_t kgs_loss_forward_workspace_bytes(int64_t M, int64_t B, bool per_sample, bool reduce) {
  int64_t bytes = 0;
  if (reduce) bytes += forward_blocks(B) * 5 * static_cast<int64_t>(sizeof(double));
  if (!per_sample) bytes += 2 * M * static_cast<int64_t>(sizeof(float));
  if (reduce) bytes += static_cast<int64_t>(sizeof(unsigned int));
  return bytes > 0 ? bytes : 1;
}

cudaError_t kgs_loss_forward(const KgsForwardArgs& a, cudaStream_t stream) {
  switch (a.h_t) {
    case KgsDType::kFloat32: return launch_forward<float>(a, stream);
    case KgsDType::kFloat16: return launch_forward<__half>(a, stream);
    default: return launch_forward<__nv_bfloat16>(a, stream);
  }
}

cudaError_t kgs_loss_backward(const KgsBackwardArgs& a, cudaStream_t stream) {
  switch (a.h_t) {
    case KgsDType::kFloat32: return launch_backward<float>(a, stream);
    case KgsDType::kFloat16: return launch_backward<__half>(a, stream);
    default: return launch_backward<__nv_bfloat16>(a, stream);
  }
}

}  // namespace cuda
}  // namespace mim_fast
