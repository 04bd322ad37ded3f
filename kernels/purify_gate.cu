// CUDA kernels of the fused purification gate (SPEC §1). See purify_gate.cuh for the contract.
//
// Forward, three launches (four when the time axis is split):
//   gate_kernel     one thread per (b, t): the gate step (mim_math.h), writing gate/ste/dq and one penalty
//                   partial sum per block;
//   penalty_kernel  one block: the penalty and 1/n from those partials, in a fixed order;
//   pool_kernel     one block per (sample, feature block, time chunk); each thread owns 16 bytes of
//                   features and keeps kUnroll loads in flight while streaming x over its time chunk;
//   finalize_kernel (only with several time chunks) sums the chunks' fp32 partials in order.
// Backward, two launches: backward_kernel, one block per (sample, feature block, 64-step tile), writes
// ∂L/∂x and the tile's per-step partial sums of ∂L/∂c over its features; combine_kernel forms ∂L/∂g.
// Every reduction has a fixed order: results are deterministic. Compiled with --fmad=false so the gate
// math rounds exactly like the CPU and Triton code.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "io.cuh"
#include "purify_gate.cuh"

#if defined(__CUDA_ARCH__) && defined(__USE_FAST_MATH__)
#error "purify_gate.cu must not be compiled with --use_fast_math: the gate math relies on IEEE division"
#endif

namespace mim_fast {
namespace cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kTile = 64;    // time steps of one backward block
constexpr int kUnroll = 4;   // time steps whose loads each thread keeps in flight
constexpr int kGateThreads = 256;

// Io<T>: kernels/io.cuh

// Features per thread: 16 bytes (4 floats, 8 halves).
template <typename T> constexpr int vec_of() { return static_cast<int>(16 / sizeof(T)); }

template <typename T>
struct alignas(16) Pack {
  T v[vec_of<T>()];
};

// Loads the features d0 .. d0+V-1 of a row (feature stride sD) that exist (< n); zero elsewhere.
template <typename T, bool kAligned>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, int64_t sD, int64_t d0, int64_t n,
                                         float (&out)[vec_of<T>()]) {
  constexpr int V = vec_of<T>();
  if (kAligned && d0 + V <= n) {
    const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p + d0);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = Io<T>::load(&pk.v[v]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = d0 + v < n ? Io<T>::load(p + (d0 + v) * sD) : 0.0f;
  }
}

template <typename T, bool kAligned>
__device__ __forceinline__ void store_vec(T* __restrict__ p, int64_t sD, int64_t d0, int64_t n,
                                          const float (&in)[vec_of<T>()]) {
  constexpr int V = vec_of<T>();
  if (kAligned && d0 + V <= n) {
    Pack<T> pk;
#pragma unroll
    for (int v = 0; v < V; ++v) Io<T>::store(&pk.v[v], in[v]);
    *reinterpret_cast<Pack<T>*>(p + d0) = pk;
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v)
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
// Must be reached by every thread of the block.
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

template <typename T>
int threads_for(int64_t D) {
  const int64_t need = (D + vec_of<T>() - 1) / vec_of<T>();
  const int64_t t = ((need + 31) / 32) * 32;
  return static_cast<int>(t < kMaxThreads ? t : kMaxThreads);
}

template <typename T>
int64_t dblocks_for(int64_t D) {
  const int64_t per = static_cast<int64_t>(threads_for<T>(D)) * vec_of<T>();
  return (D + per - 1) / per;
}

int64_t dblocks_for_type(FeatureType t, int64_t D) {
  return t == FeatureType::kFloat32 ? dblocks_for<float>(D) : dblocks_for<__half>(D);
}

int sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 132;
  return n;
}

// Vector access needs 16-byte aligned rows: the base pointers and every stride of a dimension that
// actually has more than one element.
template <typename T>
bool rows_aligned(const void* base, int64_t D, int64_t sD, int64_t T_, int64_t sT, int64_t B, int64_t sB) {
  constexpr int V = vec_of<T>();
  (void)D;  // a row shorter than V, or the tail of one, takes the element-wise path in load_vec/store_vec
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && sD == 1 && (T_ == 1 || sT % V == 0) &&
         (B == 1 || sB % V == 0);
}

// ---------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kGateThreads) gate_kernel(GateForwardArgs a, float* pen_block) {
  __shared__ float scratch[kMaxWarps];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float q = 0.0f;
  if (i < a.B * a.T) {
    const int64_t b = i / a.T, t = i % a.T;
    float u = 0.0f;
    if (a.params.mode == math::kSample) {
      u = a.noise ? a.noise[i] : math::philox_uniform(a.seed, a.offset + static_cast<uint64_t>(i));
    }
    const math::GateStep<float> st = math::gate_step<float>(a.logits[i], u, a.params);
    const bool valid = t < (a.lengths ? a.lengths[b] : a.T);
    a.gate[i] = valid ? st.h : 0.0f;
    a.ste[i] = valid ? st.ste : 0.0f;
    a.dq[i] = valid ? st.q * (1.0f - st.q) : 0.0f;
    q = valid ? st.q : 0.0f;
  }
  const float s = block_sum<float>(q, scratch);
  if (threadIdx.x == 0) pen_block[blockIdx.x] = s;
}

// One block: penalty = Σ pen_block / n and 1/n, n = Σ_b lengths[b] (or B·T), in a fixed order.
__global__ void __launch_bounds__(kMaxThreads) penalty_kernel(const float* pen_block, int64_t nblocks,
                                                              const int64_t* lengths, int64_t B, int64_t T,
                                                              float* penalty, float* inv_count) {
  __shared__ float scratch[kMaxWarps];
  __shared__ long long iscratch[kMaxWarps];
  float s = 0.0f;
  long long n = 0;  // the exact count of valid steps
  for (int64_t k = threadIdx.x; k < nblocks; k += blockDim.x) s += pen_block[k];
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) n += lengths ? lengths[b] : T;
  s = block_sum<float>(s, scratch);
  n = block_sum<long long>(n, iscratch);
  if (threadIdx.x == 0) {
    const float count = n > 0 ? static_cast<float>(n) : 1.0f;
    *penalty = s / count;
    *inv_count = 1.0f / count;
  }
}

// Pools the time steps [c·chunk, (c+1)·chunk) ∩ [0, len) of one (sample, feature block). With one chunk
// it writes pooled = Σ/len directly; otherwise fp32 partial sums at partial[(c·B + b)·D + d].
template <typename T, int ACT, bool kAligned>
__global__ void __launch_bounds__(kMaxThreads) pool_kernel(GateForwardArgs a, int64_t nblk, int64_t nchunk,
                                                           int64_t chunk, float* __restrict__ partial) {
  constexpr int V = vec_of<T>();
  const int64_t id = blockIdx.x;
  const int64_t c = id % nchunk, blk = (id / nchunk) % nblk, b = id / (nchunk * nblk);
  const int64_t d0 = (blk * blockDim.x + threadIdx.x) * V;
  if (d0 >= a.D) return;  // no block-wide synchronisation below
  const int64_t len = a.lengths ? a.lengths[b] : a.T;
  const int64_t t_begin = c * chunk;
  const int64_t t_end = len < t_begin + chunk ? len : t_begin + chunk;  // padding is never read
  const T* __restrict__ xb = static_cast<const T*>(a.x) + b * a.sB;
  const float* __restrict__ hb = a.gate + b * a.T;
  float acc[V];
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] = 0.0f;
  for (int64_t t = t_begin; t < t_end; t += kUnroll) {
    float xv[kUnroll][V];
    float hv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // issue every load before using any
      if (t + u < t_end) {
        load_vec<T, kAligned>(xb + (t + u) * a.sT, a.sD, d0, a.D, xv[u]);
        hv[u] = hb[t + u];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (t + u < t_end) {
        if (hv[u] == 0.0f) {  // a closed gate (uniform over the block): φ(x·0) = x·0 exactly
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] += math::activation_closed<float>(xv[u][v]);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) acc[v] += math::activation<float>(xv[u][v] * hv[u], ACT);
        }
      }
    }
  }
  if (nchunk == 1) {
    const float denom = static_cast<float>(len > 0 ? len : 1);  // an empty sample pools to 0
    float out[V];
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = acc[v] / denom;
    store_vec<T, kAligned>(static_cast<T*>(a.pooled) + b * a.D, 1, d0, a.D, out);
  } else {
    float* dst = partial + (c * a.B + b) * a.D;
#pragma unroll
    for (int v = 0; v < V; ++v)
      if (d0 + v < a.D) dst[d0 + v] = acc[v];
  }
}

// pooled[b, d] = Σ_c partial[c, b, d] / max(len, 1), chunks added in order.
template <typename T>
__global__ void finalize_kernel(GateForwardArgs a, int64_t nchunk, const float* __restrict__ partial) {
  const int64_t BD = a.B * a.D;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < BD;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / a.D;
    float s = 0.0f;
    for (int64_t c = 0; c < nchunk; ++c) s += partial[c * BD + i];
    const int64_t len = a.lengths ? a.lengths[b] : a.T;
    Io<T>::store(static_cast<T*>(a.pooled) + i, s / static_cast<float>(len > 0 ? len : 1));
  }
}

struct ForwardPlan {
  int64_t nblk, nchunk, chunk, gate_blocks;
};

template <typename T>
ForwardPlan forward_plan(int64_t B, int64_t T_, int64_t D) {
  ForwardPlan p;
  p.nblk = dblocks_for<T>(D);
  // Enough blocks to cover every SM several times: split the time axis when B·blocks is small, but
  // keep at least 8 steps per chunk so the partial sums stay cheap.
  const int64_t target = 4 * static_cast<int64_t>(sm_count());
  const int64_t have = B * p.nblk;
  int64_t nchunk = have >= target ? 1 : (target + have - 1) / have;
  const int64_t max_chunks = (T_ + 7) / 8;
  nchunk = nchunk < max_chunks ? nchunk : max_chunks;
  nchunk = nchunk > 1 ? nchunk : 1;
  p.chunk = (T_ + nchunk - 1) / nchunk;
  p.nchunk = (T_ + p.chunk - 1) / p.chunk;
  p.gate_blocks = (B * T_ + kGateThreads - 1) / kGateThreads;
  return p;
}

template <typename T, int ACT>
cudaError_t launch_forward(const GateForwardArgs& a, float* scratch, cudaStream_t stream) {
  const ForwardPlan p = forward_plan<T>(a.B, a.T, a.D);
  float* pen_block = scratch;
  float* partial = scratch + p.gate_blocks;
  if (p.gate_blocks > 0x7fffffffLL || a.B * p.nblk * p.nchunk > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  gate_kernel<<<static_cast<unsigned>(p.gate_blocks), kGateThreads, 0, stream>>>(a, pen_block);
  penalty_kernel<<<1, kMaxThreads, 0, stream>>>(pen_block, p.gate_blocks, a.lengths, a.B, a.T, a.penalty,
                                                a.inv_count);
  const bool aligned = rows_aligned<T>(a.x, a.D, a.sD, a.T, a.sT, a.B, a.sB) &&
                       reinterpret_cast<uintptr_t>(a.pooled) % 16 == 0 && (a.B == 1 || a.D % vec_of<T>() == 0);
  const dim3 grid(static_cast<unsigned>(a.B * p.nblk * p.nchunk));
  const int threads = threads_for<T>(a.D);
  if (aligned) {
    pool_kernel<T, ACT, true><<<grid, threads, 0, stream>>>(a, p.nblk, p.nchunk, p.chunk, partial);
  } else {
    pool_kernel<T, ACT, false><<<grid, threads, 0, stream>>>(a, p.nblk, p.nchunk, p.chunk, partial);
  }
  if (p.nchunk > 1) {
    const int64_t blocks = (a.B * a.D + 255) / 256;
    finalize_kernel<T><<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), 256, 0, stream>>>(a, p.nchunk,
                                                                                                   partial);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_forward(const GateForwardArgs& a, float* scratch, cudaStream_t stream) {
  switch (a.activation) {
    case math::kTanh: return launch_forward<T, math::kTanh>(a, scratch, stream);
    case math::kRelu: return launch_forward<T, math::kRelu>(a, scratch, stream);
    default: return launch_forward<T, math::kIdentity>(a, scratch, stream);
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------
// kWriteGx false: ∂L/∂x is not wanted, only the Σ_d reduction for ∂L/∂g (a third fewer bytes).
template <typename T, int ACT, bool kAligned, bool kWriteGx>
__global__ void __launch_bounds__(kMaxThreads) backward_kernel(GateBackwardArgs a, int64_t nblk, int64_t ntile) {
  constexpr int V = vec_of<T>();
  __shared__ float h_tile[kTile];
  __shared__ float red[kMaxWarps][kTile];
  const int64_t id = blockIdx.x;
  const int64_t tile = id % ntile, blk = (id / ntile) % nblk, b = id / (ntile * nblk);
  const int64_t t0 = tile * kTile;
  const int tn = static_cast<int>(a.T - t0 < kTile ? a.T - t0 : kTile);
  const int64_t d0 = (blk * blockDim.x + threadIdx.x) * V;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  const int64_t len = a.lengths ? a.lengths[b] : a.T;
  const T* __restrict__ xb = static_cast<const T*>(a.x) + b * a.sB;
  T* __restrict__ gxb = kWriteGx ? static_cast<T*>(a.grad_x) + b * a.gB : nullptr;  // fresh tensor: no aliasing
  const bool active = d0 < a.D;
  // Time steps with loads in flight: half as many for 16-bit features read through scalar loads
  // (unaligned rows) when ∂L/∂x is not written. Without the stores ptxas hoists every load with its
  // 64-bit address and spilled at its 128-register budget (two 256-thread blocks per SM); ptxas -v in CI
  // (benchmarks/ptxas_report.py) fails on any spill.
  constexpr int U = (kWriteGx || kAligned || sizeof(T) == 4) ? kUnroll : kUnroll / 2;
  // dy = (G / T)·φ'(y): the division first, as autograd of sum(...) / T computes it.
  const float denom = static_cast<float>(len > 0 ? len : 1);
  float gs[V];
#pragma unroll
  for (int v = 0; v < V; ++v) gs[v] = 0.0f;
  if (active) {
    load_vec<T, kAligned>(static_cast<const T*>(a.grad_pooled) + b * a.D, 1, d0, a.D, gs);
#pragma unroll
    for (int v = 0; v < V; ++v) gs[v] = gs[v] / denom;
  }
  for (int i = threadIdx.x; i < tn; i += blockDim.x) h_tile[i] = a.gate[b * a.T + t0 + i];
  __syncthreads();

  for (int i0 = 0; i0 < tn; i0 += U) {
    float xv[U][V];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // issue every load before using any
      const int64_t t = t0 + i0 + u;
      if (active && i0 + u < tn && t < len) {
        load_vec<T, kAligned>(xb + t * a.sT, a.sD, d0, a.D, xv[u]);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) xv[u][v] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i0 + u >= tn) break;  // uniform over the block
      const int64_t t = t0 + i0 + u;
      const float h = h_tile[i0 + u];
      float part = 0.0f;
      if (active) {
        float gx[V];
        if (t >= len) {  // padding: never read, zero gradient
#pragma unroll
          for (int v = 0; v < V; ++v) gx[v] = 0.0f;
        } else if (h == 0.0f) {  // a closed gate: φ'(x·0) needs no transcendental (same value)
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const float gy = gs[v] * math::activation_grad_closed<float>(xv[u][v], ACT);
            gx[v] = gy * h;
            part += gy * xv[u][v];
          }
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const float gy = gs[v] * math::activation_grad<float>(xv[u][v] * h, ACT);
            gx[v] = gy * h;
            part += gy * xv[u][v];
          }
        }
        if (kWriteGx) store_vec<T, kAligned>(gxb + t * a.gT, a.gD, d0, a.D, gx);
      }
      part = warp_sum(part);
      if (lane == 0) red[warp][i0 + u] = part;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < tn; i += blockDim.x) {
    float s = 0.0f;
    for (int w = 0; w < nwarps; ++w) s += red[w][i];  // fixed order: deterministic
    a.dc_part[(blk * a.B + b) * a.T + t0 + i] = s;
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
    grad_logits[i] = math::ste_times(ste[i], dc) + wpen * dq[i];
  }
}

template <typename T, int ACT>
cudaError_t launch_backward(const GateBackwardArgs& a, cudaStream_t stream) {
  const int64_t nblk = dblocks_for<T>(a.D);
  const int64_t ntile = (a.T + kTile - 1) / kTile;
  if (a.B * nblk * ntile > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const bool write_gx = a.grad_x != nullptr;
  const bool aligned = rows_aligned<T>(a.x, a.D, a.sD, a.T, a.sT, a.B, a.sB) &&
                       (!write_gx || rows_aligned<T>(a.grad_x, a.D, a.gD, a.T, a.gT, a.B, a.gB)) &&
                       reinterpret_cast<uintptr_t>(a.grad_pooled) % 16 == 0 && (a.B == 1 || a.D % vec_of<T>() == 0);
  const dim3 grid(static_cast<unsigned>(a.B * nblk * ntile));
  const int threads = threads_for<T>(a.D);
  if (aligned && write_gx) {
    backward_kernel<T, ACT, true, true><<<grid, threads, 0, stream>>>(a, nblk, ntile);
  } else if (write_gx) {
    backward_kernel<T, ACT, false, true><<<grid, threads, 0, stream>>>(a, nblk, ntile);
  } else if (aligned) {
    backward_kernel<T, ACT, true, false><<<grid, threads, 0, stream>>>(a, nblk, ntile);
  } else {
    backward_kernel<T, ACT, false, false><<<grid, threads, 0, stream>>>(a, nblk, ntile);
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

int64_t purify_gate_forward_scratch(FeatureType t, int64_t B, int64_t T, int64_t D) {
  const ForwardPlan p = t == FeatureType::kFloat32 ? forward_plan<float>(B, T, D) : forward_plan<__half>(B, T, D);
  return p.gate_blocks + (p.nchunk > 1 ? p.nchunk * B * D : 0);
}

cudaError_t purify_gate_forward(const GateForwardArgs& a, float* scratch, cudaStream_t stream) {
  switch (a.x_type) {
    case FeatureType::kFloat32: return dispatch_forward<float>(a, scratch, stream);
    case FeatureType::kFloat16: return dispatch_forward<__half>(a, scratch, stream);
    default: return dispatch_forward<__nv_bfloat16>(a, scratch, stream);
  }
}

int64_t purify_gate_backward_dblocks(FeatureType t, int64_t D) { return dblocks_for_type(t, D); }

cudaError_t purify_gate_backward(const GateBackwardArgs& a, cudaStream_t stream) {
  switch (a.x_type) {
    case FeatureType::kFloat32: return dispatch_backward<float>(a, stream);
    case FeatureType::kFloat16: return dispatch_backward<__half>(a, stream);
    default: return dispatch_backward<__nv_bfloat16>(a, stream);
  }
}

}  // namespace cuda
}  // namespace mim_fast
