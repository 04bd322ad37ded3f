// CUDA kernels of the fused purification gate (SPEC §1). See purify_gate.cuh for the contract.
//
// Layout: one thread block per (sample b, block of features); each thread owns VEC consecutive
// features. The gate row of b is computed a tile of time steps at a time into shared memory (every
// feature block recomputes it: T transcendentals next to T·features loads), then the block streams
// x[t, b, d] over t. Compiled with --fmad=false so the gate math rounds like the CPU and Triton code.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "purify_gate.cuh"

namespace mim_fast {
namespace cuda {
namespace {

constexpr int kVec = 4;          // features per thread
constexpr int kMaxThreads = 256;
constexpr int kTile = 64;        // time steps of the gate row held in shared memory at once
constexpr int kMaxWarps = kMaxThreads / 32;

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

template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Loads the VEC features d0..d0+VEC-1 of row p (stride sD) that exist (< n); zero elsewhere.
template <typename T, bool kAligned>
__device__ __forceinline__ void load_vec(const T* p, int64_t sD, int64_t d0, int64_t n, float (&out)[kVec]) {
  if (kAligned) {
    const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p + d0);
#pragma unroll
    for (int v = 0; v < kVec; ++v) out[v] = Io<T>::load(&pk.v[v]);
  } else {
#pragma unroll
    for (int v = 0; v < kVec; ++v) out[v] = d0 + v < n ? Io<T>::load(p + (d0 + v) * sD) : 0.0f;
  }
}

template <typename T, bool kAligned>
__device__ __forceinline__ void store_vec(T* p, int64_t sD, int64_t d0, int64_t n, const float (&in)[kVec]) {
  if (kAligned) {
    Pack<T> pk;
#pragma unroll
    for (int v = 0; v < kVec; ++v) Io<T>::store(&pk.v[v], in[v]);
    *reinterpret_cast<Pack<T>*>(p + d0) = pk;
  } else {
#pragma unroll
    for (int v = 0; v < kVec; ++v)
      if (d0 + v < n) Io<T>::store(p + (d0 + v) * sD, in[v]);
  }
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Deterministic block sum (fixed tree); every thread gets the result. `scratch` holds kMaxWarps values.
template <typename V>
__device__ V block_sum(V v, V* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  V total = V(0);
  for (int w = 0; w < nwarps; ++w) total += scratch[w];
  return total;
}

int threads_for(int64_t D) {
  const int64_t need = (D + kVec - 1) / kVec;
  const int64_t t = ((need + 31) / 32) * 32;
  return static_cast<int>(t < kMaxThreads ? t : kMaxThreads);
}

int64_t dblocks_for(int64_t D) {
  const int64_t per = static_cast<int64_t>(threads_for(D)) * kVec;
  return (D + per - 1) / per;
}

// ---------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------
template <typename T, int ACT, bool kAligned>
__global__ void __launch_bounds__(kMaxThreads) gate_forward_kernel(GateForwardArgs a, int64_t nblk) {
  __shared__ float h_tile[kTile];
  __shared__ float scratch[kMaxWarps];
  const int64_t b = blockIdx.x / nblk, blk = blockIdx.x % nblk;
  const int64_t d0 = (blk * blockDim.x + threadIdx.x) * kVec;
  const int64_t len = a.lengths ? a.lengths[b] : a.T;
  const T* xb = static_cast<const T*>(a.x) + b * a.sB;
  float acc[kVec] = {0.0f, 0.0f, 0.0f, 0.0f};
  float pen = 0.0f;

  for (int64_t t0 = 0; t0 < a.T; t0 += kTile) {
    const int64_t tn = a.T - t0 < kTile ? a.T - t0 : kTile;
    __syncthreads();  // the previous tile's readers are done with h_tile
    for (int64_t i = threadIdx.x; i < tn; i += blockDim.x) {
      const int64_t t = t0 + i, bt = b * a.T + t;
      float u = 0.0f;
      if (a.params.mode == math::kSample) {
        u = a.noise ? a.noise[bt] : math::philox_uniform(a.seed, a.offset + static_cast<uint64_t>(bt));
      }
      const math::GateStep<float> st = math::gate_step<float>(a.logits[bt], u, a.params);
      const bool valid = t < len;
      const float h = valid ? st.h : 0.0f;
      h_tile[i] = h;
      if (blk == 0) {  // the first feature block of each sample owns the (B, T) outputs
        a.gate[bt] = h;
        a.ste[bt] = valid ? st.ste : 0.0f;
        a.dq[bt] = valid ? st.q * (1.0f - st.q) : 0.0f;
        pen += valid ? st.q : 0.0f;
      }
    }
    __syncthreads();
    const int64_t tend = len - t0 < tn ? len - t0 : tn;  // padding steps are never read
    if (d0 < a.D) {
#pragma unroll 4
      for (int64_t i = 0; i < tend; ++i) {
        float xv[kVec];
        load_vec<T, kAligned>(xb + (t0 + i) * a.sT, a.sD, d0, a.D, xv);
        const float h = h_tile[i];
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[v] += math::activation<float>(xv[v] * h, ACT);
      }
    }
  }
  if (blk == 0) {
    const float total = block_sum<float>(pen, scratch);
    if (threadIdx.x == 0) a.pen_row[b] = total;
  }
  if (d0 < a.D) {
    const float denom = static_cast<float>(len > 0 ? len : 1);  // an empty sample pools to 0
    float out[kVec];
#pragma unroll
    for (int v = 0; v < kVec; ++v) out[v] = acc[v] / denom;
    store_vec<T, kAligned>(static_cast<T*>(a.pooled) + b * a.D, 1, d0, a.D, out);
  }
}

// One block: penalty = Σ_b pen_row[b] / n and 1/n, n = Σ_b lengths[b] (or B·T), fixed summation order.
__global__ void __launch_bounds__(kMaxThreads) penalty_kernel(const float* pen_row, const int64_t* lengths,
                                                              int64_t B, int64_t T, float* penalty,
                                                              float* inv_count) {
  __shared__ float scratch[kMaxWarps];
  __shared__ long long iscratch[kMaxWarps];
  float s = 0.0f;
  long long n = 0;  // exact count of valid steps
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    s += pen_row[b];
    n += lengths ? lengths[b] : T;
  }
  s = block_sum(s, scratch);
  n = block_sum(n, iscratch);
  if (threadIdx.x == 0) {
    const float count = n > 0 ? static_cast<float>(n) : 1.0f;
    *penalty = s / count;
    *inv_count = 1.0f / count;
  }
}

template <typename T, int ACT>
cudaError_t launch_forward(const GateForwardArgs& a, cudaStream_t stream) {
  const int threads = threads_for(a.D);
  const int64_t nblk = dblocks_for(a.D);
  const bool aligned = a.sD == 1 && a.D % kVec == 0 && a.sT % kVec == 0 && a.sB % kVec == 0 &&
                       reinterpret_cast<uintptr_t>(a.x) % (sizeof(T) * kVec) == 0 &&
                       reinterpret_cast<uintptr_t>(a.pooled) % (sizeof(T) * kVec) == 0;
  const dim3 grid(static_cast<unsigned>(a.B * nblk));
  if (aligned) {
    gate_forward_kernel<T, ACT, true><<<grid, threads, 0, stream>>>(a, nblk);
  } else {
    gate_forward_kernel<T, ACT, false><<<grid, threads, 0, stream>>>(a, nblk);
  }
  penalty_kernel<<<1, kMaxThreads, 0, stream>>>(a.pen_row, a.lengths, a.B, a.T, a.penalty, a.inv_count);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_forward(const GateForwardArgs& a, cudaStream_t stream) {
  switch (a.activation) {
    case math::kTanh: return launch_forward<T, math::kTanh>(a, stream);
    case math::kRelu: return launch_forward<T, math::kRelu>(a, stream);
    default: return launch_forward<T, math::kIdentity>(a, stream);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------
template <typename T, int ACT, bool kAligned>
__global__ void __launch_bounds__(kMaxThreads) gate_backward_kernel(GateBackwardArgs a, int64_t nblk) {
  __shared__ float h_tile[kTile];
  __shared__ float red[kMaxWarps][kTile];
  const int64_t b = blockIdx.x / nblk, blk = blockIdx.x % nblk;
  const int64_t d0 = (blk * blockDim.x + threadIdx.x) * kVec;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  const int64_t len = a.lengths ? a.lengths[b] : a.T;
  const T* xb = static_cast<const T*>(a.x) + b * a.sB;
  T* gxb = static_cast<T*>(a.grad_x) + b * a.gB;
  const bool active = d0 < a.D;
  // dy = (G / T)·φ'(y): divide first, as autograd of sum(...) / T does.
  const float denom = static_cast<float>(len > 0 ? len : 1);
  float gs[kVec] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (active) {
    load_vec<T, kAligned>(static_cast<const T*>(a.grad_pooled) + b * a.D, 1, d0, a.D, gs);
#pragma unroll
    for (int v = 0; v < kVec; ++v) gs[v] = gs[v] / denom;
  }
  const bool grad_aligned = kAligned && a.gD == 1 && a.gT % kVec == 0 && a.gB % kVec == 0;

  for (int64_t t0 = 0; t0 < a.T; t0 += kTile) {
    const int64_t tn = a.T - t0 < kTile ? a.T - t0 : kTile;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < tn; i += blockDim.x) h_tile[i] = a.gate[b * a.T + t0 + i];
    __syncthreads();
#pragma unroll 2
    for (int64_t i = 0; i < tn; ++i) {
      const int64_t t = t0 + i;
      float part = 0.0f;
      if (active) {
        float gx[kVec] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (t < len) {  // padding: never read, zero gradient
          float xv[kVec];
          load_vec<T, kAligned>(xb + t * a.sT, a.sD, d0, a.D, xv);
          const float h = h_tile[i];
#pragma unroll
          for (int v = 0; v < kVec; ++v) {
            const float gy = gs[v] * math::activation_grad<float>(xv[v] * h, ACT);
            gx[v] = gy * h;
            part += gy * xv[v];
          }
        }
        if (grad_aligned) {
          store_vec<T, true>(gxb + t * a.gT, 1, d0, a.D, gx);
        } else {
          store_vec<T, false>(gxb + t * a.gT, a.gD, d0, a.D, gx);
        }
      }
      part = warp_sum(part);
      if (lane == 0) red[warp][i] = part;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < tn; i += blockDim.x) {
      float s = 0.0f;
      for (int w = 0; w < nwarps; ++w) s += red[w][i];  // fixed order: deterministic
      a.dc_part[(blk * a.B + b) * a.T + t0 + i] = s;
    }
  }
}

// ∂L/∂g[b, t] = ste·Σ_blk dc_part[blk, b, t] + ∂L/∂P·dq/n.
__global__ void combine_kernel(const float* dc_part, int64_t nblk, int64_t BT, const float* ste, const float* dq,
                               const float* grad_penalty, const float* inv_count, float* grad_logits) {
  const float wpen = *grad_penalty * *inv_count;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < BT;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    float dc = 0.0f;
    for (int64_t k = 0; k < nblk; ++k) dc += dc_part[k * BT + i];
    grad_logits[i] = ste[i] * dc + wpen * dq[i];
  }
}

template <typename T, int ACT>
cudaError_t launch_backward(const GateBackwardArgs& a, cudaStream_t stream) {
  const int threads = threads_for(a.D);
  const int64_t nblk = dblocks_for(a.D);
  const bool aligned = a.sD == 1 && a.D % kVec == 0 && a.sT % kVec == 0 && a.sB % kVec == 0 &&
                       reinterpret_cast<uintptr_t>(a.x) % (sizeof(T) * kVec) == 0 &&
                       reinterpret_cast<uintptr_t>(a.grad_x) % (sizeof(T) * kVec) == 0 &&
                       reinterpret_cast<uintptr_t>(a.grad_pooled) % (sizeof(T) * kVec) == 0;
  const dim3 grid(static_cast<unsigned>(a.B * nblk));
  if (aligned) {
    gate_backward_kernel<T, ACT, true><<<grid, threads, 0, stream>>>(a, nblk);
  } else {
    gate_backward_kernel<T, ACT, false><<<grid, threads, 0, stream>>>(a, nblk);
  }
  const int64_t BT = a.B * a.T;
  const int64_t cblocks = (BT + 255) / 256;
  combine_kernel<<<static_cast<unsigned>(cblocks < 4096 ? cblocks : 4096), 256, 0, stream>>>(
      a.dc_part, nblk, BT, a.ste, a.dq, a.grad_penalty, a.inv_count, a.grad_logits);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_backward(const GateBackwardArgs& a, cudaStream_t stream) {
  switch (a.activation) {
    case math::kTanh: return launch_backward<T, math::kTanh>(a, stream);
    case math::kRelu: return launch_backward<T, math::kRelu>(a, stream);
    default: return launch_backward<T, math::kIdentity>(a, stream);
  }
}

}  // namespace

cudaError_t purify_gate_forward(const GateForwardArgs& a, cudaStream_t stream) {
  switch (a.x_type) {
    case FeatureType::kFloat32: return dispatch_forward<float>(a, stream);
    case FeatureType::kFloat16: return dispatch_forward<__half>(a, stream);
    default: return dispatch_forward<__nv_bfloat16>(a, stream);
  }
}

int64_t purify_gate_backward_dblocks(int64_t D) { return dblocks_for(D); }

cudaError_t purify_gate_backward(const GateBackwardArgs& a, cudaStream_t stream) {
  switch (a.x_type) {
    case FeatureType::kFloat32: return dispatch_backward<float>(a, stream);
    case FeatureType::kFloat16: return dispatch_backward<__half>(a, stream);
    default: return dispatch_backward<__nv_bfloat16>(a, stream);
  }
}

}  // namespace cuda
}  // namespace mim_fast
