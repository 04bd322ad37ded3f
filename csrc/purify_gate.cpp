// mim_fast::purify_gate_forward / purify_gate_backward: the fused purification gate (SPEC §1).
//
// The op entry points below serve CPU and CUDA tensors: they check and convert arguments, allocate
// the outputs, and run the C++ kernel in this file or launch kernels/purify_gate.cu. Autograd, the
// fake (meta) functions and the public API live in mim_fast/ops/purify_gate.py.
//
// Forward, one pass over x: per sample b the gate row h[b, :] is computed (mim_math.h gate_step, noise
// from Philox or the given tensor), then pooled[b, :] = Σ_t φ(x[t, b, :]·h[b, t]) / T (or / lengths[b]).
// Backward, one pass over x: ∂L/∂x = G·φ'(x·h)/T·h and ∂L/∂c[b, t] = Σ_d G·φ'(x·h)/T·x in the same
// loop; then ∂L/∂g = ste·∂L/∂c + ∂L/∂P·dq/n. Only (B, T)-sized state is saved between them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "cpu_memory.h"
#include "mim_math.h"

#if MIM_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "purify_gate.cuh"
#endif

namespace mim_fast {
namespace {

using math::GateParams;

int parse_mode(c10::string_view mode) {
  if (mode == "sample") return math::kSample;
  if (mode == "expected") return math::kExpected;
  TORCH_CHECK(false, "mim_fast::purify_gate: mode must be 'sample' or 'expected', got '", std::string(mode), "'");
}

int parse_activation(c10::string_view act) {
  if (act == "tanh") return math::kTanh;
  if (act == "relu") return math::kRelu;
  if (act == "identity") return math::kIdentity;
  TORCH_CHECK(false, "mim_fast::purify_gate: activation must be 'tanh', 'relu' or 'identity', got '",
              std::string(act), "'");
}

// t as a contiguous tensor of dtype `type`: t itself when it already is one (the usual case), without
// the two dispatched calls (to, contiguous) that find out.
at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType type) {
  if (t.scalar_type() == type && t.is_contiguous()) return t;
  return t.to(type).contiguous();
}

// Noise, lengths and logits are (B, T)/(B,)-sized: converting them costs nothing next to the x pass.
struct Prepared {
  at::ScalarType acc;
  at::Tensor logits, noise, lengths;
};

Prepared prepare(const at::Tensor& x, const at::Tensor& logits, const c10::optional<at::Tensor>& noise,
                 const c10::optional<at::Tensor>& lengths) {
  TORCH_CHECK(x.dim() == 3, "mim_fast::purify_gate: x must be (T, B, D)");
  const int64_t T = x.size(0), B = x.size(1);
  TORCH_CHECK(T > 0 && B > 0 && x.size(2) > 0, "mim_fast::purify_gate: x must be non-empty, got ", x.sizes());
  TORCH_CHECK(logits.device() == x.device(), "mim_fast::purify_gate: logits must be on x's device");
  TORCH_CHECK(!noise.has_value() || noise->device() == x.device(), "mim_fast::purify_gate: noise must be on x's device");
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == B && logits.size(1) == T,
              "mim_fast::purify_gate: logits must be (B, T)");
  const bool f64 = x.scalar_type() == at::kDouble || logits.scalar_type() == at::kDouble ||
                   (noise.has_value() && noise->scalar_type() == at::kDouble);
  Prepared p;
  p.acc = f64 ? at::kDouble : at::kFloat;
  p.logits = as_contiguous(logits, p.acc);
  if (noise.has_value()) {
    TORCH_CHECK(noise->dim() == 2 && noise->size(0) == B && noise->size(1) == T,
                "mim_fast::purify_gate: noise must be (B, T)");
    p.noise = as_contiguous(*noise, p.acc);
  }
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B, "mim_fast::purify_gate: lengths must be (B,)");
    // Clamped to [0, T]: values on a GPU are not checked (that would need a host sync), and every
    // kernel may then rely on 0 <= lengths[b] <= T.
    p.lengths = lengths->to(x.device(), at::kLong).clamp(0, T).contiguous();
  }
  return p;
}

template <typename acc_t>
GateParams<acc_t> make_params(int mode, double loc_bias, double beta, double zeta_gamma, double gamma,
                              double threshold, double pen_shift) {
  GateParams<acc_t> p;
  p.loc_bias = static_cast<acc_t>(loc_bias);
  p.beta = static_cast<acc_t>(beta);
  p.zeta_gamma = static_cast<acc_t>(zeta_gamma);
  p.gamma = static_cast<acc_t>(gamma);
  p.threshold = static_cast<acc_t>(threshold);
  p.pen_shift = static_cast<acc_t>(pen_shift);
  p.noise_lo = static_cast<acc_t>(1e-6);
  p.noise_hi = static_cast<acc_t>(1.0 - 1e-6);
  p.mode = mode;
  return p;
}

// ---------------------------------------------------------------------------------------------------
// CPU work partition. The feature passes walk x in memory order (time-major for the (T, B, D) layout,
// sample-major for a batch-first view) over a chunk of samples, accumulating the chunk's pooled rows,
// so reads stream through whole pages instead of hopping one short row per time step.
// ---------------------------------------------------------------------------------------------------
struct Tiling {
  int64_t rows, nchunks;   // samples per chunk, number of chunks
  int64_t dblock, ndblk;   // features per block, number of blocks
  int64_t items() const { return nchunks * ndblk; }
};

Tiling make_tiling(int64_t B, int64_t D) {
  Tiling tl;
  tl.dblock = D <= 2048 ? D : 1024;
  tl.ndblk = (D + tl.dblock - 1) / tl.dblock;
  const int64_t target_items = 8 * static_cast<int64_t>(at::get_num_threads());  // load balance
  int64_t rows = (B * tl.ndblk + target_items - 1) / target_items;
  rows = std::min(rows, std::max<int64_t>(1, 65536 / tl.dblock));  // accumulators stay in L2
  tl.rows = std::max<int64_t>(1, std::min(rows, B));
  tl.nchunks = (B + tl.rows - 1) / tl.rows;
  return tl;
}

// ---------------------------------------------------------------------------------------------------
// The feature loops, compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time: the same
// IEEE operations at every width (no FMA contraction), so the results do not depend on the CPU.
// ---------------------------------------------------------------------------------------------------
// Isa, cpu_isa(), MIM_ISA_DISPATCH and MIM_ALWAYS_INLINE: cpu_isa.h (shared with the KGS loss).

template <typename scalar_t, typename acc_t>
struct FeaturePass {
  const scalar_t* x;
  int64_t T, B, D, sT, sB, sD;
  const acc_t* h;           // (B, T) gate
  const int64_t* lens;      // (B,) or null
  // forward
  scalar_t* pooled;         // (B, D)
  // backward
  const scalar_t* G;        // (B, D) ∂L/∂pooled
  scalar_t* gx;             // ∂L/∂x, strides gT, gB, gD; null: not wanted (only Σ_d ∂L/∂y·x is computed)
  int64_t gT, gB, gD;
  acc_t* dc_part;           // (ndblk, B, T)
};

// One step of the forward: acc_b += φ(x[t, b, d0:d0+n]·h[b, t]).
template <int ACT, typename scalar_t, typename acc_t>
MIM_ALWAYS_INLINE void pool_step(const FeaturePass<scalar_t, acc_t>& p, int64_t t, int64_t b, int64_t d0, int64_t n,
                                 acc_t* __restrict__ a) {
  if (p.lens && t >= p.lens[b]) return;  // padding is never read
  const acc_t ht = p.h[b * p.T + t];
  const scalar_t* __restrict__ row = p.x + t * p.sT + b * p.sB + d0 * p.sD;
  const int64_t sD = p.sD;
  if (ht == acc_t(0)) {  // a closed gate: φ(x·0) = x·0 exactly, no transcendental to evaluate
    for (int64_t d = 0; d < n; ++d) a[d] += math::activation_closed<acc_t>(static_cast<acc_t>(row[d * sD]));
  } else if (sD == 1) {  // contiguous features: the loop the compiler vectorizes
    for (int64_t d = 0; d < n; ++d) a[d] += math::activation<acc_t>(static_cast<acc_t>(row[d]) * ht, ACT);
  } else {
    for (int64_t d = 0; d < n; ++d) a[d] += math::activation<acc_t>(static_cast<acc_t>(row[d * sD]) * ht, ACT);
  }
}

// Forward of one item (sample chunk × feature block), walking x in memory order:
// pooled = Σ_{t < len} φ(x·h) / max(len, 1).
template <int ACT, typename scalar_t, typename acc_t>
MIM_ALWAYS_INLINE void pool_item_body(const FeaturePass<scalar_t, acc_t>& p, int64_t b0, int64_t b1, int64_t d0,
                                      int64_t n, acc_t* __restrict__ acc) {
  for (int64_t i = 0; i < (b1 - b0) * n; ++i) acc[i] = acc_t(0);
  if (p.sT >= p.sB) {  // time-major memory (the (T, B, D) layout)
    for (int64_t t = 0; t < p.T; ++t)
      for (int64_t b = b0; b < b1; ++b) pool_step<ACT>(p, t, b, d0, n, acc + (b - b0) * n);
  } else {  // sample-major memory (a batch-first view)
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = 0; t < p.T; ++t) pool_step<ACT>(p, t, b, d0, n, acc + (b - b0) * n);
  }
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t len = p.lens ? p.lens[b] : p.T;
    const acc_t denom = static_cast<acc_t>(len > 0 ? len : 1);  // an empty sample pools to 0, not 0/0
    for (int64_t d = 0; d < n; ++d) p.pooled[b * p.D + d0 + d] = static_cast<scalar_t>(acc[(b - b0) * n + d] / denom);
  }
}

// Partial sums of Σ_d ∂L/∂y·x in kLanes interleaved lanes, added pairwise in a fixed order at the end:
// a reduction the compiler can vectorize (it may not reorder a plain sum) with the same result at every
// vector width.
constexpr int kLanes = 16;

// One step of the backward: writes ∂L/∂x[t, b, d0:d0+n], returns Σ_d ∂L/∂y·x.
template <int ACT, typename scalar_t, typename acc_t>
MIM_ALWAYS_INLINE acc_t backward_step(const FeaturePass<scalar_t, acc_t>& p, int64_t t, int64_t b, int64_t d0,
                                      int64_t n, const acc_t* __restrict__ g) {
  // write: ∂L/∂x wanted. A loop-invariant test: the compiler unswitches the loops below on it.
  const bool write = p.gx != nullptr;
  scalar_t* __restrict__ gr = write ? p.gx + t * p.gT + b * p.gB + d0 * p.gD : nullptr;
  const int64_t gD = p.gD, sD = p.sD;
  if (p.lens && t >= p.lens[b]) {  // padding: never read, zero gradient
    if (write)
      for (int64_t d = 0; d < n; ++d) gr[d * gD] = scalar_t(0);
    return acc_t(0);
  }
  const acc_t ht = p.h[b * p.T + t];
  const scalar_t* __restrict__ xr = p.x + t * p.sT + b * p.sB + d0 * sD;
  acc_t lanes[kLanes] = {};
  int64_t d = 0;
  // φ'(x·h); at a closed gate φ'(x·0) needs no transcendental (the same value bit for bit).
  const bool closed = ht == acc_t(0);
  // The contiguous loops, one copy per (closed, write) pair with both known at compile time: with a
  // store under a run-time test GCC left the unrolled 16 lanes scalar (vmulss/vaddss, ~2 cycles an element
  // at MIM's size); without it they vectorize. Each lane computes the same operations either way.
  auto contiguous = [&](auto closed_c, auto write_c) MIM_ALWAYS_INLINE_LAMBDA {
    constexpr bool kClosed = decltype(closed_c)::value, kWrite = decltype(write_c)::value;
    for (; d + kLanes <= n; d += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t xv = static_cast<acc_t>(xr[d + l]);
        const acc_t dphi = kClosed ? math::activation_grad_closed<acc_t>(xv, ACT)
                                   : math::activation_grad<acc_t>(xv * ht, ACT);
        const acc_t gy = g[d + l] * dphi;
        if constexpr (kWrite) gr[d + l] = static_cast<scalar_t>(gy * ht);
        lanes[l] += gy * xv;
      }
    }
  };
  if (sD == 1 && (gD == 1 || !write)) {
    using T_ = std::true_type;
    using F_ = std::false_type;
    if (closed) {
      if (write) contiguous(T_(), T_()); else contiguous(T_(), F_());
    } else {
      if (write) contiguous(F_(), T_()); else contiguous(F_(), F_());
    }
  }
  acc_t tail = acc_t(0);
  for (; d < n; ++d) {  // the tail, and strided layouts: a running sum of its own
    const acc_t xv = static_cast<acc_t>(xr[d * sD]);
    const acc_t dphi = closed ? math::activation_grad_closed<acc_t>(xv, ACT) : math::activation_grad<acc_t>(xv * ht, ACT);
    const acc_t gy = g[d] * dphi;
    if (write) gr[d * gD] = static_cast<scalar_t>(gy * ht);
    tail += gy * xv;
  }
  // The lanes are only ever indexed by constants (so they stay in vector registers) and are added in a
  // fixed pairwise order: the same sum at every vector width, in 4 dependent additions instead of the 16
  // of a running sum through memory (which was a quarter of the backward at MIM's size).
  static_assert(kLanes == 16, "the reduction below adds 16 lanes");
  for (int l = 0; l < 8; ++l) lanes[l] += lanes[l + 8];
  for (int l = 0; l < 4; ++l) lanes[l] += lanes[l + 4];
  for (int l = 0; l < 2; ++l) lanes[l] += lanes[l + 2];
  return (lanes[0] + lanes[1]) + tail;
}

// Backward of one item: ∂L/∂x = (G/len)·φ'(x·h)·h and dc_part = Σ_d (G/len)·φ'(x·h)·x per step.
template <int ACT, typename scalar_t, typename acc_t>
MIM_ALWAYS_INLINE void backward_item_body(const FeaturePass<scalar_t, acc_t>& p, int64_t b0, int64_t b1, int64_t d0,
                                          int64_t n, int64_t dblk, acc_t* __restrict__ gs) {
  for (int64_t b = b0; b < b1; ++b) {
    // dy = (G / T)·φ'(y): the division first, as autograd of sum(...) / T computes it.
    const int64_t len = p.lens ? p.lens[b] : p.T;
    const acc_t denom = static_cast<acc_t>(len > 0 ? len : 1);
    for (int64_t d = 0; d < n; ++d) gs[(b - b0) * n + d] = static_cast<acc_t>(p.G[b * p.D + d0 + d]) / denom;
  }
  acc_t* dc = p.dc_part + dblk * p.B * p.T;
  if (p.sT >= p.sB) {
    for (int64_t t = 0; t < p.T; ++t)
      for (int64_t b = b0; b < b1; ++b) dc[b * p.T + t] = backward_step<ACT>(p, t, b, d0, n, gs + (b - b0) * n);
  } else {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = 0; t < p.T; ++t) dc[b * p.T + t] = backward_step<ACT>(p, t, b, d0, n, gs + (b - b0) * n);
  }
}

// pool_item / backward_item: the bodies above compiled per ISA, with a run-time switch (cpu_isa.h).
MIM_ISA_VARIANTS((int ACT, typename scalar_t, typename acc_t), (ACT, scalar_t, acc_t), pool_item,
                 (const FeaturePass<scalar_t, acc_t>& p, int64_t b0, int64_t b1, int64_t d0, int64_t n, acc_t* acc),
                 (p, b0, b1, d0, n, acc))
MIM_ISA_VARIANTS((int ACT, typename scalar_t, typename acc_t), (ACT, scalar_t, acc_t), backward_item,
                 (const FeaturePass<scalar_t, acc_t>& p, int64_t b0, int64_t b1, int64_t d0, int64_t n, int64_t dblk,
                  acc_t* gs),
                 (p, b0, b1, d0, n, dblk, gs))

// Below this many feature elements (T·B·D) a pass runs on one thread: waking the OpenMP team costs more
// than it saves. Measured on the 2-core CI VM, kernels alone, forward+backward: T=50 B=16 D=80 (64 000)
// 202 µs on one thread, 135 µs on two (an earlier kernel, with separate gate and pooling regions and 2^18
// here, had measured 0.35 ms on one and 0.63 ms on two).
constexpr int64_t kParallelMinElements = int64_t(1) << 14;

// Runs item(i, buffer) over every (sample chunk × feature block) item, in parallel for large inputs, with
// a per-thread buffer of rows·dblock accumulators. The threads claim items one at a time rather than in
// equal static shares: an open gate costs a transcendental per element and a closed one none, so samples
// differ in cost, and a static split left one thread waiting at the barrier. Each item's results depend
// only on the item, never on the thread that ran it.
template <typename acc_t, typename F>
void for_items(const Tiling& tl, int64_t elements, F&& item) {
  const int64_t items = tl.items();
  if (elements < kParallelMinElements || items == 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
    std::vector<acc_t> buf(tl.rows * tl.dblock);
    for (int64_t i = 0; i < items; ++i) item(i, buf.data());
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t, int64_t) {
    std::vector<acc_t> buf(tl.rows * tl.dblock);
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < items;
         i = next.fetch_add(1, std::memory_order_relaxed))
      item(i, buf.data());
  });
}

template <typename F>
void dispatch_activation(int act, F&& f) {
  switch (act) {
    case math::kTanh: f(std::integral_constant<int, math::kTanh>()); break;
    case math::kRelu: f(std::integral_constant<int, math::kRelu>()); break;
    default: f(std::integral_constant<int, math::kIdentity>()); break;
  }
}

// ---------------------------------------------------------------------------------------------------
// The gate pass: per sample b, every step's gate state from its logit and noise (mim_math.h gate_step).
// Written as loops over a chunk of steps that the compiler vectorizes — Philox's 32×32→64-bit products,
// the bit-exact log/exp/sigmoid are lane-wise IEEE operations — compiled per ISA like the feature loops;
// at MIM's size (B·T = 800 steps) this pass was most of the forward (~45 ns a step, scalar). The
// penalty row is summed in step order after the chunk, so the result does not depend on the width.
// ---------------------------------------------------------------------------------------------------
template <typename acc_t>
struct GateRows {
  const acc_t* g;            // (B, T) logits
  const acc_t* noise;        // (B, T) or null: Philox(seed, offset + b·T + t)
  const int64_t* lens;       // (B,) or null
  uint64_t seed, offset;
  int64_t T;
  const GateParams<acc_t>* params;
  acc_t *gate, *ste, *dq;    // (B, T) outputs
  acc_t* pen_row;            // (B,) Σ_t q over the valid steps
};

constexpr int64_t kGateChunk = 64;

template <typename acc_t>
MIM_ALWAYS_INLINE void gate_rows_body(const GateRows<acc_t>& r, int64_t b0, int64_t b1) {
  const GateParams<acc_t> params = *r.params;
  const int64_t T = r.T;
  alignas(64) acc_t u[kGateChunk];
  alignas(64) acc_t q[kGateChunk];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t len = r.lens ? r.lens[b] : T;
    acc_t pen = acc_t(0);
    for (int64_t t0 = 0; t0 < T; t0 += kGateChunk) {
      const int64_t n = std::min(kGateChunk, T - t0);
      const int64_t bt0 = b * T + t0;
      if (params.mode == math::kSample) {
        if (r.noise) {
          for (int64_t i = 0; i < n; ++i) u[i] = r.noise[bt0 + i];
        } else {
          const uint64_t c0 = r.offset + static_cast<uint64_t>(bt0);
          for (int64_t i = 0; i < n; ++i) u[i] = static_cast<acc_t>(math::philox_uniform(r.seed, c0 + i));
        }
      } else {
        for (int64_t i = 0; i < n; ++i) u[i] = acc_t(0);
      }
      for (int64_t i = 0; i < n; ++i) {
        const math::GateStep<acc_t> st = math::gate_step<acc_t>(r.g[bt0 + i], u[i], params);
        const bool valid = t0 + i < len;
        r.gate[bt0 + i] = valid ? st.h : acc_t(0);
        r.ste[bt0 + i] = valid ? st.ste : acc_t(0);
        r.dq[bt0 + i] = valid ? st.q * (acc_t(1) - st.q) : acc_t(0);
        q[i] = valid ? st.q : acc_t(0);
      }
      for (int64_t i = 0; i < n; ++i) pen += q[i];  // in step order: the same sum at every width
    }
    r.pen_row[b] = pen;
  }
}

MIM_ISA_VARIANTS((typename acc_t), (acc_t), gate_rows, (const GateRows<acc_t>& r, int64_t b0, int64_t b1),
                 (r, b0, b1))

// ---------------------------------------------------------------------------------------------------
// CPU forward: pass 1 computes the gate row of every sample (B·T steps), pass 2 pools the features.
// ---------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
void forward_cpu(const at::Tensor& x, const Prepared& in, uint64_t seed, uint64_t offset,
                 const GateParams<acc_t>& params, int act, at::Tensor& pooled, at::Tensor& gate, at::Tensor& ste,
                 at::Tensor& dq, at::Tensor& penalty, at::Tensor& inv_count) {
  const int64_t T = x.size(0), B = x.size(1), D = x.size(2);
  const acc_t* g = in.logits.data_ptr<acc_t>();
  const acc_t* noise = in.noise.defined() ? in.noise.data_ptr<acc_t>() : nullptr;
  const int64_t* lens = in.lengths.defined() ? in.lengths.data_ptr<int64_t>() : nullptr;
  acc_t* gate_p = gate.data_ptr<acc_t>();
  acc_t* ste_p = ste.data_ptr<acc_t>();
  acc_t* dq_p = dq.data_ptr<acc_t>();
  std::vector<acc_t> pen_row(B, acc_t(0));

  // the gate pass: vectorized over time steps (gate_rows), worth threads from a few thousand steps
  const GateRows<acc_t> rows{g, noise, lens, seed, offset, T, &params, gate_p, ste_p, dq_p, pen_row.data()};
  const Isa isa = cpu_isa();
  const Tiling tl = make_tiling(B, D);
  // When every sample lies in one work item (D ≤ 2048: one feature block), the item computes its samples'
  // gate rows right before pooling them: one parallel region instead of two, and the gate pass spread
  // over the threads with the pooling (at MIM's size it was a serial fifth of the forward). Each row is
  // computed the same way wherever it runs, so the results do not change.
  const bool rows_in_items = tl.ndblk == 1;
  if (!rows_in_items) {
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / T), [&](int64_t begin, int64_t end) {
      gate_rows<acc_t>(isa, rows, begin, end);
    });
  }

  FeaturePass<scalar_t, acc_t> p{};
  p.x = x.data_ptr<scalar_t>();
  p.T = T; p.B = B; p.D = D;
  p.sT = x.stride(0); p.sB = x.stride(1); p.sD = x.stride(2);
  p.h = gate_p;
  p.lens = lens;
  p.pooled = pooled.data_ptr<scalar_t>();
  dispatch_activation(act, [&](auto act_c) {
    for_items<acc_t>(tl, T * B * D, [&](int64_t i, acc_t* buf) {
      const int64_t chunk = i / tl.ndblk, dblk = i % tl.ndblk;
      const int64_t b0 = chunk * tl.rows, b1 = std::min(B, b0 + tl.rows);
      const int64_t d0 = dblk * tl.dblock, n = std::min(D, d0 + tl.dblock) - d0;
      if (rows_in_items) gate_rows<acc_t>(isa, rows, b0, b1);
      pool_item<decltype(act_c)::value, scalar_t, acc_t>(isa, p, b0, b1, d0, n, buf);
    });
  });

  int64_t n_valid = B * T;
  if (lens) {
    n_valid = 0;
    for (int64_t b = 0; b < B; ++b) n_valid += lens[b];
  }
  acc_t total = acc_t(0);
  for (int64_t b = 0; b < B; ++b) total += pen_row[b];  // fixed order: deterministic
  const acc_t count = static_cast<acc_t>(n_valid > 0 ? n_valid : 1);
  // (fresh CPU scalars: written in place, not through two dispatched fill_ calls)
  *penalty.data_ptr<acc_t>() = total / count;
  *inv_count.data_ptr<acc_t>() = acc_t(1) / count;
}

// ---------------------------------------------------------------------------------------------------
// CPU backward: the feature pass, then ∂L/∂g = ste·Σ dc_part + ∂L/∂P·dq/n.
// ---------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
void backward_cpu(const at::Tensor& grad_pooled, acc_t grad_penalty, const at::Tensor& x, const at::Tensor& gate,
                  const at::Tensor& ste, const at::Tensor& dq, acc_t inv_count, const at::Tensor& lengths, int act,
                  at::Tensor& grad_x, at::Tensor& grad_logits) {
  const int64_t T = x.size(0), B = x.size(1), D = x.size(2);
  const Tiling tl = make_tiling(B, D);
  std::vector<acc_t> dc_part(tl.ndblk * B * T);
  FeaturePass<scalar_t, acc_t> p{};
  p.x = x.data_ptr<scalar_t>();
  p.T = T; p.B = B; p.D = D;
  p.sT = x.stride(0); p.sB = x.stride(1); p.sD = x.stride(2);
  p.h = gate.data_ptr<acc_t>();
  p.lens = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  p.G = grad_pooled.data_ptr<scalar_t>();
  if (grad_x.numel() > 0) {
    p.gx = grad_x.data_ptr<scalar_t>();
    p.gT = grad_x.stride(0); p.gB = grad_x.stride(1); p.gD = grad_x.stride(2);
  }
  p.dc_part = dc_part.data();
  const Isa isa = cpu_isa();
  const acc_t* ste_p = ste.data_ptr<acc_t>();
  const acc_t* dq_p = dq.data_ptr<acc_t>();
  acc_t* out = grad_logits.data_ptr<acc_t>();
  const acc_t wpen = grad_penalty * inv_count;
  const int64_t ndblk = tl.ndblk;
  // ∂L/∂g of steps [bt0, bt1): ste·Σ_k dc_part[k] (blocks added in a fixed order) + ∂L/∂P·dq/n
  auto logit_grads = [&](int64_t bt0, int64_t bt1) {
    for (int64_t bt = bt0; bt < bt1; ++bt) {
      acc_t dc = acc_t(0);
      for (int64_t k = 0; k < ndblk; ++k) dc += dc_part[k * B * T + bt];  // fixed order
      out[bt] = math::ste_times(ste_p[bt], dc) + wpen * dq_p[bt];
    }
  };
  // With one feature block (D ≤ 2048) an item holds its samples' every step: it finishes their ∂L/∂g
  // itself, inside the parallel region, instead of a serial pass after it (the same operations).
  const bool rows_in_items = ndblk == 1;
  dispatch_activation(act, [&](auto act_c) {
    for_items<acc_t>(tl, T * B * D, [&](int64_t i, acc_t* buf) {
      const int64_t chunk = i / tl.ndblk, dblk = i % tl.ndblk;
      const int64_t b0 = chunk * tl.rows, b1 = std::min(B, b0 + tl.rows);
      const int64_t d0 = dblk * tl.dblock, n = std::min(D, d0 + tl.dblock) - d0;
      backward_item<decltype(act_c)::value, scalar_t, acc_t>(isa, p, b0, b1, d0, n, dblk, buf);
      if (rows_in_items) logit_grads(b0 * T, b1 * T);
    });
  });
  if (!rows_in_items) {
    at::parallel_for(0, B * T, 4096, [&](int64_t begin, int64_t end) { logit_grads(begin, end); });
  }
}

#if MIM_FAST_WITH_CUDA
cuda::FeatureType feature_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::FeatureType::kFloat32;
    case at::kHalf: return cuda::FeatureType::kFloat16;
    case at::kBFloat16: return cuda::FeatureType::kBFloat16;
    default: TORCH_CHECK(false, "mim_fast::purify_gate (cuda): x must be float32, float16 or bfloat16, got ", t);
  }
}
#endif

// The value of a one-element CPU tensor as T: read in place when it already is a T (item() is a
// dispatched op, ~1 µs each, twice per backward).
template <typename T>
T scalar_value(const at::Tensor& t) {
  if (t.scalar_type() == c10::CppTypeToScalarType<T>::value) return *t.const_data_ptr<T>();
  return t.item<T>();
}

// ---------------------------------------------------------------------------------------------------
// Op entry points
// ---------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> purify_gate_forward(
    const at::Tensor& x, const at::Tensor& logits, const c10::optional<at::Tensor>& noise,
    const c10::optional<at::Tensor>& lengths, int64_t seed, int64_t offset, c10::string_view mode,
    c10::string_view activation, double loc_bias, double beta, double zeta_gamma, double gamma, double threshold,
    double pen_shift) {
  TORCH_CHECK(seed >= 0 && offset >= 0, "mim_fast::purify_gate: seed and offset must be >= 0");
  const int mode_i = parse_mode(mode), act = parse_activation(activation);
  const Prepared in = prepare(x, logits, noise, lengths);
  const int64_t T = x.size(0), B = x.size(1), D = x.size(2);
  const auto acc_opts = x.options().dtype(in.acc);
  at::Tensor pooled = at::empty({B, D}, x.options());
  at::Tensor gate = at::empty({B, T}, acc_opts);
  at::Tensor ste = at::empty({B, T}, acc_opts);
  at::Tensor dq = at::empty({B, T}, acc_opts);
  at::Tensor penalty = at::empty({}, acc_opts);
  at::Tensor inv_count = at::empty({}, acc_opts);
  const uint64_t useed = static_cast<uint64_t>(seed), uoff = static_cast<uint64_t>(offset);

  if (x.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "purify_gate_forward_cpu", [&] {
      if (in.acc == at::kDouble) {
        forward_cpu<scalar_t, double>(x, in, useed, uoff,
                                      make_params<double>(mode_i, loc_bias, beta, zeta_gamma, gamma, threshold,
                                                          pen_shift),
                                      act, pooled, gate, ste, dq, penalty, inv_count);
      } else {
        forward_cpu<scalar_t, float>(x, in, useed, uoff,
                                     make_params<float>(mode_i, loc_bias, beta, zeta_gamma, gamma, threshold,
                                                        pen_shift),
                                     act, pooled, gate, ste, dq, penalty, inv_count);
      }
    });
  } else {
#if MIM_FAST_WITH_CUDA
    TORCH_CHECK(x.is_cuda(), "mim_fast::purify_gate: unsupported device ", x.device());
    TORCH_CHECK(in.acc == at::kFloat, "mim_fast::purify_gate (cuda): float64 is supported on the CPU only");
    const c10::cuda::CUDAGuard guard(x.device());
    at::Tensor scratch =
        at::empty({cuda::purify_gate_forward_scratch(feature_type(x.scalar_type()), B, T, D)}, acc_opts);
    cuda::GateForwardArgs a{};
    a.x = x.data_ptr();
    a.x_type = feature_type(x.scalar_type());
    a.T = T; a.B = B; a.D = D;
    a.sT = x.stride(0); a.sB = x.stride(1); a.sD = x.stride(2);
    a.logits = in.logits.data_ptr<float>();
    a.noise = in.noise.defined() ? in.noise.data_ptr<float>() : nullptr;
    a.lengths = in.lengths.defined() ? in.lengths.data_ptr<int64_t>() : nullptr;
    a.seed = useed; a.offset = uoff;
    a.params = make_params<float>(mode_i, loc_bias, beta, zeta_gamma, gamma, threshold, pen_shift);
    a.activation = act;
    a.pooled = pooled.data_ptr();
    a.gate = gate.data_ptr<float>(); a.ste = ste.data_ptr<float>(); a.dq = dq.data_ptr<float>();
    a.penalty = penalty.data_ptr<float>(); a.inv_count = inv_count.data_ptr<float>();
    const cudaError_t err =
        cuda::purify_gate_forward(a, scratch.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "mim_fast::purify_gate_forward: CUDA launch failed: ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "mim_fast::purify_gate: this build has no CUDA kernels");
#endif
  }
  if (logits.scalar_type() != in.acc) {  // (logits in their own dtype; the acc dtype is returned as is)
    penalty = penalty.to(logits.scalar_type());
    gate = gate.to(logits.scalar_type());
  }
  return {pooled, penalty, gate, ste, dq, inv_count};
}

std::tuple<at::Tensor, at::Tensor> purify_gate_backward(const at::Tensor& grad_pooled, const at::Tensor& grad_penalty,
                                                        const at::Tensor& x, const at::Tensor& gate,
                                                        const at::Tensor& ste, const at::Tensor& dq,
                                                        const at::Tensor& inv_count,
                                                        const c10::optional<at::Tensor>& lengths,
                                                        c10::string_view activation, bool needs_grad_x) {
  const int act = parse_activation(activation);
  TORCH_CHECK(x.dim() == 3 && x.numel() > 0, "mim_fast::purify_gate_backward: x must be a non-empty (T, B, D)");
  const int64_t T = x.size(0), B = x.size(1), D = x.size(2);
  for (const at::Tensor* t : {&grad_pooled, &grad_penalty, &gate, &ste, &dq, &inv_count}) {
    TORCH_CHECK(t->device() == x.device(), "mim_fast::purify_gate_backward: every tensor must be on x's device (",
                x.device(), "), got one on ", t->device());
  }
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == B && gate.size(1) == T && ste.sizes() == gate.sizes() &&
                  dq.sizes() == gate.sizes() && grad_pooled.dim() == 2 && grad_pooled.size(0) == B &&
                  grad_pooled.size(1) == D && grad_penalty.numel() == 1 && inv_count.numel() == 1,
              "mim_fast::purify_gate_backward: inconsistent shapes");
  const at::ScalarType acc = ste.scalar_type();
  const at::Tensor G = as_contiguous(grad_pooled, x.scalar_type());
  const at::Tensor h = as_contiguous(gate, acc);
  const at::Tensor lens =
      lengths.has_value() ? lengths->to(x.device(), at::kLong).clamp(0, T).contiguous() : at::Tensor();
  // keeps x's layout when x is dense (e.g. a batch-first view); (0,) and never written when not wanted
  at::Tensor grad_x = needs_grad_x ? empty_large_like(x) : at::empty({0}, x.options());
  at::Tensor grad_logits = at::empty({B, T}, ste.options());

  if (x.is_cpu()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "purify_gate_backward_cpu", [&] {
      if (acc == at::kDouble) {
        backward_cpu<scalar_t, double>(G, scalar_value<double>(grad_penalty), x, h, as_contiguous(ste, acc),
                                       as_contiguous(dq, acc), scalar_value<double>(inv_count), lens, act, grad_x,
                                       grad_logits);
      } else {
        backward_cpu<scalar_t, float>(G, scalar_value<float>(grad_penalty), x, h, as_contiguous(ste, acc),
                                      as_contiguous(dq, acc), scalar_value<float>(inv_count), lens, act, grad_x,
                                      grad_logits);
      }
    });
  } else {
#if MIM_FAST_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const at::Tensor gpen = grad_penalty.to(at::kFloat).contiguous();
    at::Tensor dc_part = at::empty({cuda::purify_gate_backward_dblocks(feature_type(x.scalar_type()), D), B, T},
                                   ste.options());
    cuda::GateBackwardArgs a{};
    a.x = x.data_ptr();
    a.x_type = feature_type(x.scalar_type());
    a.T = T; a.B = B; a.D = D;
    a.sT = x.stride(0); a.sB = x.stride(1); a.sD = x.stride(2);
    a.grad_pooled = G.data_ptr();
    a.grad_penalty = gpen.data_ptr<float>();
    a.gate = h.data_ptr<float>();
    const at::Tensor ste_c = ste.contiguous(), dq_c = dq.contiguous();
    a.ste = ste_c.data_ptr<float>(); a.dq = dq_c.data_ptr<float>();
    a.inv_count = inv_count.data_ptr<float>();
    a.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
    a.activation = act;
    if (needs_grad_x) {
      a.grad_x = grad_x.data_ptr();
      a.gT = grad_x.stride(0); a.gB = grad_x.stride(1); a.gD = grad_x.stride(2);
    }
    a.dc_part = dc_part.data_ptr<float>();
    a.grad_logits = grad_logits.data_ptr<float>();
    const cudaError_t err = cuda::purify_gate_backward(a, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "mim_fast::purify_gate_backward: CUDA launch failed: ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false, "mim_fast::purify_gate: this build has no CUDA kernels");
#endif
  }
  return {grad_x, grad_logits.scalar_type() == gate.scalar_type() ? grad_logits : grad_logits.to(gate.scalar_type())};
}

// Elementwise access to the shared float32 math, so the tests can compare it bit for bit with the torch
// and Triton implementations: fn is "exp", "log", "sigmoid", "tanh" (tanh32, the gate math's) or
// "tanh_features" / "tanh_grad_features" (tanh_rational32 / sech2_32: what the CPU feature passes
// evaluate for φ and φ').
at::Tensor math32_cpu(const at::Tensor& x, c10::string_view fn) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "mim_fast::_math32: x must be float32");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const float* src = xc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = xc.numel();
  const int which = fn == "exp" ? 0 : fn == "log" ? 1 : fn == "sigmoid" ? 2 : fn == "tanh" ? 3
                    : fn == "tanh_features" ? 4 : fn == "tanh_grad_features" ? 5 : -1;
  TORCH_CHECK(which >= 0, "mim_fast::_math32: unknown function '", std::string(fn), "'");
  for (int64_t i = 0; i < n; ++i) {
    const float v = src[i];
    dst[i] = which == 0 ? math::exp32(v) : which == 1 ? math::log32(v) : which == 2 ? math::sigmoid32(v)
           : which == 3 ? math::tanh32(v) : which == 4 ? math::tanh_<float>(v)
           : math::activation_grad<float>(v, math::kTanh);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mim_fast, CPU, m) {
  m.impl("purify_gate_forward", &purify_gate_forward);
  m.impl("purify_gate_backward", &purify_gate_backward);
  m.impl("_math32", &math32_cpu);
}

#if MIM_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mim_fast, CUDA, m) {
  m.impl("purify_gate_forward", &purify_gate_forward);
  m.impl("purify_gate_backward", &purify_gate_backward);
}
#endif

}  // namespace mim_fast
