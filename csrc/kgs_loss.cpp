// mim_fast::kgs_loss_forward / kgs_loss_backward: the fused KGS loss (SPEC §2), and
// mim_fast::kgs_loss_heads_forward / kgs_loss_heads_backward: the same with MIM's per-modality heads
// computing the predictions inside the pass (CPU only here; the Triton backend has its own kernels).
//
// The op entry points serve CPU and CUDA tensors: they check arguments, allocate the outputs and run
// the C++ kernel in this file or launch kernels/kgs_loss.cu. Autograd, the fake (meta) functions and
// the public API live in mim_fast/ops/kgs_loss.py.
//
// Forward, one pass over the samples (at::parallel_for): per sample i the errors, the routing (intra
// directions, Adjuster α, teacher), the softmax statistics of the teacher's and every student's h row,
// the KL terms and — when requested — every gradient of every term: the (M, B)-sized per-term
// gradients of the predictions and the one (M, B, D) gradient the inter term has w.r.t. h. h is read
// from memory once (a sample's M rows stay in L1 across the per-row passes), ∂inter/∂h written once.
// With per_sample=False a first pass over the (M, B) errors computes the M batch means.
// Backward, one pass: scales the saved per-term gradients by the incoming gradients (B·M + M·B·D).
// Threads: at::parallel_for over samples (OpenMP: the build links -fopenmp); every reduction has a
// partition fixed by the sizes, not the thread count, so results are bit-identical run to run.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "cpu_memory.h"
#include "kgs_math.h"

#if MIM_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kgs_loss.cuh"
#endif

namespace mim_fast {
namespace {

enum Reduction : int { kMean = 0, kSum = 1, kNone = 2 };

int parse_reduction(c10::string_view r) {
  if (r == "mean") return kMean;
  if (r == "sum") return kSum;
  if (r == "none") return kNone;
  TORCH_CHECK(false, "mim_fast::kgs_loss: reduction must be 'mean', 'sum' or 'none', got '", std::string(r), "'");
}

// The terms' order in the outputs, the weights and the incoming gradients.
enum Term : int { kLoss = 0, kIntra = 1, kInter = 2, kMasked = 3, kUnmasked = 4 };
// Rows of the saved (4, M, B) prediction gradients.
enum SavedRow : int { kIntraYk = 0, kIntraYu = 1, kMaskedYk = 2, kUnmaskedYu = 3 };

struct Shapes {
  int64_t M, B, D;
};

Shapes check_forward_args(const at::Tensor& yk, const at::Tensor& yu, const at::Tensor& y, const at::Tensor& h,
                          at::ArrayRef<double> weights, double kd_scale, double eps) {
  TORCH_CHECK(yk.dim() == 2 && yk.size(0) >= 2 && yk.size(1) >= 1,
              "mim_fast::kgs_loss: yk must be (M, B) with M >= 2 and B >= 1, got ", yk.sizes());
  const int64_t M = yk.size(0), B = yk.size(1);
  TORCH_CHECK(yu.dim() == 2 && yu.size(0) == M && yu.size(1) == B, "mim_fast::kgs_loss: yu must be (M, B) = ",
              yk.sizes(), ", got ", yu.sizes());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == B, "mim_fast::kgs_loss: y must be (B,) with B = ", B, ", got ", y.sizes());
  TORCH_CHECK(h.dim() == 3 && h.size(0) == M && h.size(1) == B && h.size(2) >= 1,
              "mim_fast::kgs_loss: h must be (M, B, D) with D >= 1 and (M, B) = ", yk.sizes(), ", got ", h.sizes());
  for (const at::Tensor* t : {&yk, &yu, &y, &h}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "mim_fast::kgs_loss: inputs must be floating point, got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == yk.device(), "mim_fast::kgs_loss: all inputs must be on one device");
  }
  TORCH_CHECK(weights.size() == 4, "mim_fast::kgs_loss: weights must be 4 numbers, got ", weights.size());
  TORCH_CHECK(kd_scale > 0 && std::isfinite(kd_scale), "mim_fast::kgs_loss: kd_scale must be finite and > 0");
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "mim_fast::kgs_loss: eps must be finite and > 0");
  return {M, B, h.size(2)};
}

// ---------------------------------------------------------------------------------------------------
// CPU kernel
// ---------------------------------------------------------------------------------------------------
template <typename scalar_t, typename A>
struct ForwardCpu {
  int64_t M, B, D;
  const A* yk;  // (M, B) contiguous, or null with heads
  const A* yu;  // (M, B) contiguous, or null with heads
  const A* y;   // (B,)
  const scalar_t* h;
  int64_t hM, hB, hD;   // strides of h (elements)
  // kgs_loss_with_heads: yk[m, i] = h[m, i]·head_w[m] + head_b[m], yu likewise from hu, each rounded to
  // the predictions' dtype (pred_round) as a Linear in that dtype would; yk/yu above are then null.
  const scalar_t* hu;
  int64_t uM, uB, uD;   // strides of hu
  const A* head_w;      // (M, D) contiguous
  const A* head_b;      // (M,)
  int pred_round;
  const A* rk_mean;     // (M,) batch means (per_sample=False) or null
  const A* ru_mean;
  A kd_scale, eps, scale;  // scale: the reduction's 1/B (mean) or 1, folded into the saved gradients
  A w[4];
  bool divide_T;
  // outputs
  A* terms;          // (5, B) per sample: loss, intra, inter, masked, unmasked
  int64_t* teacher;  // (B,)
  A* alpha;          // (M, B)
  A* grad_preds;     // (4, M, B) or null
  scalar_t* grad_h;  // (M, B, D) contiguous, or null
};

// kLanes independent partial sums per reduction: loops the compiler vectorizes (it may not reorder a
// single sum) with one fixed summation order at every vector width, so every ISA gives the same bits.
constexpr int kLanes = 16;

// Isa, cpu_isa(), MIM_ISA_DISPATCH and MIM_ALWAYS_INLINE: cpu_isa.h (shared with the gate).

template <typename A>
MIM_ALWAYS_INLINE A sum_lanes(const A* lanes) {
  A s = A(0);
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// max_d x[d], x = h·inv_s. NaN elements are skipped here; they reach the sum of exponentials below.
template <typename scalar_t, typename A>
MIM_ALWAYS_INLINE A row_max(const scalar_t* __restrict__ row, int64_t sD, int64_t D, A inv_s) {
  A lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = -static_cast<A>(INFINITY);
  int64_t d = 0;
  if (sD == 1) {
    for (; d + kLanes <= D; d += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const A x = static_cast<A>(row[d + l]) * inv_s;
        lanes[l] = x > lanes[l] ? x : lanes[l];
      }
    }
  }
  for (; d < D; ++d) {
    const A x = static_cast<A>(row[d * sD]) * inv_s;
    lanes[d % kLanes] = x > lanes[d % kLanes] ? x : lanes[d % kLanes];
  }
  A mx = lanes[0];
  for (int l = 1; l < kLanes; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
  return mx;
}

// z[d] = x[d] − mx and e[d] = exp(z[d]) into the sample's buffers; returns Σ_d e[d].
template <typename scalar_t, typename A>
MIM_ALWAYS_INLINE A row_shift_exp(const scalar_t* __restrict__ row, int64_t sD, int64_t D, A inv_s, A mx,
                                  A* __restrict__ z, A* __restrict__ e) {
  A lanes[kLanes] = {};
  int64_t d = 0;
  if (sD == 1) {
    for (; d + kLanes <= D; d += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const A v = static_cast<A>(row[d + l]) * inv_s - mx;
        const A ev = math::exp_<A>(v);
        z[d + l] = v;
        e[d + l] = ev;
        lanes[l] += ev;
      }
    }
  }
  for (; d < D; ++d) {
    const A v = static_cast<A>(row[d * sD]) * inv_s - mx;
    const A ev = math::exp_<A>(v);
    z[d] = v;
    e[d] = ev;
    lanes[d % kLanes] += ev;
  }
  return sum_lanes(lanes);
}

// A row's softmax in the buffers: z = x − max, e = exp(z), log Σe and 1/Σe.
template <typename A>
struct RowSoftmax {
  const A* z;
  const A* e;
  A log_sum, inv_sum;
};

// One student row: returns KL(p ‖ q_m) = Σ_d p·(log p − log q) with p = e_t/Σe_t, log p = z_t − log Σe_t
// (q likewise) and, with kGrad, writes grad_row[d] = coef·(q − p). No exponential here: they were
// taken once per row by row_shift_exp.
template <typename scalar_t, typename A, bool kGrad>
MIM_ALWAYS_INLINE A student_kl(const RowSoftmax<A>& t, const RowSoftmax<A>& s, int64_t D, A coef,
                               scalar_t* __restrict__ grad_row) {
  const A* __restrict__ zt = t.z;
  const A* __restrict__ et = t.e;
  const A* __restrict__ zs = s.z;
  const A* __restrict__ es = s.e;
  A lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const kgs::KLElement<A> k = kgs::kl_from_probs<A>(et[d + l] * t.inv_sum, zt[d + l] - t.log_sum,
                                                       es[d + l] * s.inv_sum, zs[d + l] - s.log_sum);
      lanes[l] += k.kl;
      if (kGrad) grad_row[d + l] = static_cast<scalar_t>(coef * k.q_minus_p);
    }
  }
  for (; d < D; ++d) {
    const kgs::KLElement<A> k =
        kgs::kl_from_probs<A>(et[d] * t.inv_sum, zt[d] - t.log_sum, es[d] * s.inv_sum, zs[d] - s.log_sum);
    lanes[d % kLanes] += k.kl;
    if (kGrad) grad_row[d] = static_cast<scalar_t>(coef * k.q_minus_p);
  }
  return sum_lanes(lanes);
}

// Rounding of a head's output to the predictions' dtype (a Linear in that dtype rounds once at the end).
enum PredRound : int { kRoundNone = 0, kRoundHalf = 1, kRoundBFloat16 = 2, kRoundFloat = 3 };

template <typename A>
MIM_ALWAYS_INLINE A round_prediction(A v, int how) {
  switch (how) {
    case kRoundHalf: return static_cast<A>(static_cast<float>(static_cast<at::Half>(static_cast<float>(v))));
    case kRoundBFloat16: return static_cast<A>(static_cast<float>(static_cast<at::BFloat16>(static_cast<float>(v))));
    case kRoundFloat: return static_cast<A>(static_cast<float>(v));
    default: return v;
  }
}

// Σ_d row[d]·w[d] in kLanes partial sums (vectorizable, one order at every width).
template <typename scalar_t, typename A>
MIM_ALWAYS_INLINE A row_dot(const scalar_t* __restrict__ row, int64_t sD, int64_t D, const A* __restrict__ w) {
  A lanes[kLanes] = {};
  int64_t d = 0;
  if (sD == 1) {
    for (; d + kLanes <= D; d += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<A>(row[d + l]) * w[d + l];
    }
  }
  for (; d < D; ++d) lanes[d % kLanes] += static_cast<A>(row[d * sD]) * w[d];
  return sum_lanes(lanes);
}

// The predictions of sample i from the heads (kgs_loss_with_heads).
template <typename scalar_t, typename A>
MIM_ALWAYS_INLINE void head_predictions(const ForwardCpu<scalar_t, A>& a, int64_t i, A* pk, A* pu) {
  for (int64_t m = 0; m < a.M; ++m) {
    const A* w = a.head_w + m * a.D;
    pk[m] = round_prediction<A>(row_dot<scalar_t, A>(a.h + m * a.hM + i * a.hB, a.hD, a.D, w) + a.head_b[m],
                                a.pred_round);
    pu[m] = round_prediction<A>(row_dot<scalar_t, A>(a.hu + m * a.uM + i * a.uB, a.uD, a.D, w) + a.head_b[m],
                                a.pred_round);
  }
}

// Per-thread scratch: the errors and Adjuster state of one sample and the z = x − max and exp(z) rows
// of its M h rows (2·M·D values: L1/L2-resident for MIM's sizes).
template <typename A>
struct Workspace {
  std::vector<A> rk, ru, pk, pu, z, e, log_sum, inv_sum;
  Workspace(int64_t M, int64_t D) : rk(M), ru(M), pk(M), pu(M), z(M * D), e(M * D), log_sum(M), inv_sum(M) {}
  RowSoftmax<A> row(int64_t m, int64_t D) const {
    return {z.data() + m * D, e.data() + m * D, log_sum[m], inv_sum[m]};
  }
};

// Everything of sample i (see the file comment).
template <typename scalar_t, typename A>
MIM_ALWAYS_INLINE void forward_sample(const ForwardCpu<scalar_t, A>& a, int64_t i, Workspace<A>& ws) {
  const int64_t M = a.M, B = a.B, D = a.D;
  const A yi = a.y[i];
  if (a.yk == nullptr) {  // heads: the predictions from this sample's rows (h's stay in L1 for the KL)
    head_predictions(a, i, ws.pk.data(), ws.pu.data());
  } else {
    for (int64_t m = 0; m < M; ++m) {
      ws.pk[m] = a.yk[m * B + i];
      ws.pu[m] = a.yu[m * B + i];
    }
  }
  A intra = A(0), masked = A(0), unmasked = A(0), sum_rk = A(0);
  kgs::TeacherScan<A> scan = kgs::TeacherScan<A>::empty();
  for (int64_t m = 0; m < M; ++m) {
    const A yk = ws.pk[m], yu = ws.pu[m];
    const A ek = std::abs(yk - yi), eu = std::abs(yu - yi);
    masked += ek;
    unmasked += eu;
    const A rk = a.rk_mean ? a.rk_mean[m] : ek;
    const A ru = a.ru_mean ? a.ru_mean[m] : eu;
    ws.rk[m] = rk;
    sum_rk += rk;
    scan.add(rk, m);
    const kgs::IntraTerm<A> it = kgs::intra_term<A>(yk, yu, kgs::intra_direction<A>(rk, ru), a.scale);
    intra += it.value;
    if (a.grad_preds) {
      a.grad_preds[(kIntraYk * M + m) * B + i] = it.d_yk;
      a.grad_preds[(kIntraYu * M + m) * B + i] = it.d_yu;
      a.grad_preds[(kMaskedYk * M + m) * B + i] = a.scale * kgs::sign0<A>(yk - yi);
      a.grad_preds[(kUnmaskedYu * M + m) * B + i] = a.scale * kgs::sign0<A>(yu - yi);
    }
  }
  // Adjuster: inv[m] into ru's slot (ru is not needed any more), then α.
  A sum_inv = A(0);
  for (int64_t m = 0; m < M; ++m) {
    ws.ru[m] = kgs::adjuster_inv<A>(ws.rk[m], sum_rk, a.eps);
    sum_inv += ws.ru[m];
  }
  for (int64_t m = 0; m < M; ++m) a.alpha[m * B + i] = kgs::adjuster_alpha<A>(ws.ru[m], sum_inv, M);
  const int64_t t = scan.teacher();
  a.teacher[i] = t;

  A inter = A(0);
  if (t >= 0) {
    const kgs::Distill<A> c = kgs::distill_constants<A>(a.kd_scale, a.alpha[t * B + i], a.divide_T, a.scale);
    for (int64_t m = 0; m < M; ++m) {
      const scalar_t* row = a.h + m * a.hM + i * a.hB;
      const A mx = row_max<scalar_t, A>(row, a.hD, D, c.inv_s);
      const A sum = row_shift_exp<scalar_t, A>(row, a.hD, D, c.inv_s, mx, ws.z.data() + m * D, ws.e.data() + m * D);
      ws.log_sum[m] = math::log_<A>(sum);
      ws.inv_sum[m] = A(1) / sum;
    }
    const RowSoftmax<A> teacher_row = ws.row(t, D);
    A kl = A(0);
    for (int64_t m = 0; m < M; ++m) {
      scalar_t* grow = a.grad_h ? a.grad_h + (m * B + i) * D : nullptr;
      if (m == t) {
        if (grow) for (int64_t d = 0; d < D; ++d) grow[d] = scalar_t(0);  // the teacher learns nothing
        continue;
      }
      kl += grow ? student_kl<scalar_t, A, true>(teacher_row, ws.row(m, D), D, c.grad_coef, grow)
                 : student_kl<scalar_t, A, false>(teacher_row, ws.row(m, D), D, c.grad_coef, nullptr);
    }
    inter = c.half_T2 * kl;
  } else if (a.grad_h) {  // no teacher: nothing is distilled, h is not read
    for (int64_t m = 0; m < M; ++m) {
      scalar_t* grow = a.grad_h + (m * B + i) * D;
      for (int64_t d = 0; d < D; ++d) grow[d] = scalar_t(0);
    }
  }
  a.terms[kIntra * B + i] = intra;
  a.terms[kInter * B + i] = inter;
  a.terms[kMasked * B + i] = masked;
  a.terms[kUnmasked * B + i] = unmasked;
  a.terms[kLoss * B + i] = kgs::weighted_loss<A>(a.w, intra, inter, masked, unmasked);
}

template <typename scalar_t, typename A>
MIM_ALWAYS_INLINE void forward_range_body(const ForwardCpu<scalar_t, A>& a, int64_t begin, int64_t end) {
  Workspace<A> ws(a.M, a.D);
  for (int64_t i = begin; i < end; ++i) forward_sample(a, i, ws);
}

// forward_range compiled for AVX-512, AVX2 and baseline x86-64, picked at run time (cpu_isa.h). The same
// IEEE operations at every width (no FMA contraction: -ffp-contract=off), so results do not depend on the CPU.
MIM_ISA_VARIANTS((typename scalar_t, typename A), (scalar_t, A), forward_range,
                 (const ForwardCpu<scalar_t, A>& a, int64_t begin, int64_t end), (a, begin, end))

// Batch means of the errors (per_sample=False), summed in double in sample order: deterministic and
// independent of the thread count.
template <typename A>
void batch_means(const A* yk, const A* yu, const A* y, int64_t M, int64_t B, A* rk_mean, A* ru_mean) {
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      double sk = 0.0, su = 0.0;
      for (int64_t i = 0; i < B; ++i) {
        sk += static_cast<double>(std::abs(yk[m * B + i] - y[i]));
        su += static_cast<double>(std::abs(yu[m * B + i] - y[i]));
      }
      rk_mean[m] = static_cast<A>(sk / static_cast<double>(B));
      ru_mean[m] = static_cast<A>(su / static_cast<double>(B));
    }
  });
}

struct ForwardOptions {
  bool per_sample, divide_T, grad_preds, grad_h;
  int reduction;
  double kd_scale, eps;
  double w[4];
};

// kgs_loss_with_heads, per_sample=False: the predictions of every sample first (the batch means need
// them all), into (M, B) buffers the fused pass then reads.
template <typename scalar_t, typename A>
MIM_ALWAYS_INLINE void predictions_range_body(const ForwardCpu<scalar_t, A>& a, int64_t begin, int64_t end, A* pk,
                                              A* pu) {
  std::vector<A> k(a.M), u(a.M);
  for (int64_t i = begin; i < end; ++i) {
    head_predictions(a, i, k.data(), u.data());
    for (int64_t m = 0; m < a.M; ++m) {
      pk[m * a.B + i] = k[m];
      pu[m * a.B + i] = u[m];
    }
  }
}

MIM_ISA_VARIANTS((typename scalar_t, typename A), (scalar_t, A), predictions_range,
                 (const ForwardCpu<scalar_t, A>& a, int64_t begin, int64_t end, A* pk, A* pu), (a, begin, end, pk, pu))

// The heads of kgs_loss_with_heads: h_unmasked (any strides, h's dtype), weight (M, D) and bias (M,)
// in the compute dtype, contiguous.
struct Heads {
  at::Tensor hu, weight, bias;
  int pred_round;
};

template <typename scalar_t, typename A>
void forward_cpu(const at::Tensor& yk, const at::Tensor& yu, const at::Tensor& y, const at::Tensor& h,
                 const Heads* heads, const ForwardOptions& o, at::Tensor& terms, at::Tensor& teacher,
                 at::Tensor& alpha, at::Tensor& grad_preds, at::Tensor& grad_h) {
  const int64_t M = h.size(0), B = h.size(1), D = h.size(2);
  ForwardCpu<scalar_t, A> a{};
  a.M = M; a.B = B; a.D = D;
  a.y = y.data_ptr<A>();
  a.h = h.data_ptr<scalar_t>();
  a.hM = h.stride(0); a.hB = h.stride(1); a.hD = h.stride(2);
  const Isa isa = cpu_isa();
  // ~16K feature values per task: enough work to amortize a task, small enough to balance threads.
  const int64_t grain = std::max<int64_t>(1, 16384 / (M * D));
  std::vector<A> preds;
  if (heads != nullptr) {
    a.hu = heads->hu.data_ptr<scalar_t>();
    a.uM = heads->hu.stride(0); a.uB = heads->hu.stride(1); a.uD = heads->hu.stride(2);
    a.head_w = heads->weight.data_ptr<A>();
    a.head_b = heads->bias.data_ptr<A>();
    a.pred_round = heads->pred_round;
    if (!o.per_sample) {
      preds.resize(2 * M * B);
      at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
        predictions_range<scalar_t, A>(isa, a, begin, end, preds.data(), preds.data() + M * B);
      });
      a.yk = preds.data();
      a.yu = preds.data() + M * B;
    }
  } else {
    a.yk = yk.data_ptr<A>();
    a.yu = yu.data_ptr<A>();
  }
  std::vector<A> means;
  if (!o.per_sample) {
    means.resize(2 * M);
    batch_means<A>(a.yk, a.yu, a.y, M, B, means.data(), means.data() + M);
    a.rk_mean = means.data();
    a.ru_mean = means.data() + M;
  }
  // Scalars rounded once to the compute type, as torch does with Python floats against a tensor.
  a.kd_scale = static_cast<A>(o.kd_scale);
  a.eps = static_cast<A>(o.eps);
  a.scale = o.reduction == kMean ? static_cast<A>(1.0 / static_cast<double>(B)) : A(1);
  for (int k = 0; k < 4; ++k) a.w[k] = static_cast<A>(o.w[k]);
  a.divide_T = o.divide_T;
  a.terms = terms.data_ptr<A>();
  a.teacher = teacher.data_ptr<int64_t>();
  a.alpha = alpha.data_ptr<A>();
  a.grad_preds = o.grad_preds ? grad_preds.data_ptr<A>() : nullptr;
  a.grad_h = o.grad_h ? grad_h.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) { forward_range<scalar_t, A>(isa, a, begin, end); });
}

// Backward: c_k[i] = G_k[i] + w_k·G_loss[i] per term, then
//   ∂yk = c_intra·saved[intra_yk] + c_masked·saved[masked_yk], ∂yu likewise,
//   ∂y  = −(c_masked·Σ_m saved[masked_yk] + c_unmasked·Σ_m saved[unmasked_yu]),  ∂h = c_inter·saved_h.
template <typename A>
struct Upstream {
  const A* g[5];  // null: no gradient reached that output (zero)
  int64_t stride[5];
  A w[4];
  MIM_ALWAYS_INLINE A factor(int term, int64_t i) const {
    const A gl = g[kLoss] ? g[kLoss][i * stride[kLoss]] : A(0);
    const A gt = g[term] ? g[term][i * stride[term]] : A(0);
    return kgs::chain_factor<A>(gt, w[term - 1], gl);
  }
};

template <typename scalar_t, typename A>
void backward_h_cpu(const Upstream<A>& up, const at::Tensor& saved_h, at::Tensor& grad_h) {
  const int64_t M = saved_h.size(0), B = saved_h.size(1), D = saved_h.size(2);
  const scalar_t* src = saved_h.data_ptr<scalar_t>();
  scalar_t* dst = grad_h.data_ptr<scalar_t>();
  at::parallel_for(0, M * B, std::max<int64_t>(1, 32768 / D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const A c = up.factor(kInter, r % B);
      const scalar_t* s = src + r * D;
      scalar_t* o = dst + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(c * static_cast<A>(s[d]));
    }
  });
}

template <typename A>
void backward_preds_cpu(const Upstream<A>& up, const A* saved, int64_t M, int64_t B, A* gyk, A* gyu, A* gy) {
  // The intra term's saved gradients can be NaN without a transfer (kgs_math.h intra_term); like the
  // reference, they count only when a gradient reached the intra term (directly or through the loss).
  const bool intra_reached = up.g[kIntra] != nullptr || up.g[kLoss] != nullptr;
  at::parallel_for(0, B, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const A c_intra = up.factor(kIntra, i), c_masked = up.factor(kMasked, i), c_unmasked = up.factor(kUnmasked, i);
      A sk = A(0), su = A(0);
      for (int64_t m = 0; m < M; ++m) {
        const A ik = intra_reached ? saved[(kIntraYk * M + m) * B + i] : A(0);
        const A iu = intra_reached ? saved[(kIntraYu * M + m) * B + i] : A(0);
        const A mk = saved[(kMaskedYk * M + m) * B + i], mu = saved[(kUnmaskedYu * M + m) * B + i];
        gyk[m * B + i] = c_intra * ik + c_masked * mk;
        gyu[m * B + i] = c_intra * iu + c_unmasked * mu;
        sk += mk;
        su += mu;
      }
      gy[i] = -(c_masked * sk + c_unmasked * su);
    }
  });
}

#if MIM_FAST_WITH_CUDA
cuda::KgsDType kgs_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::KgsDType::kFloat32;
    case at::kHalf: return cuda::KgsDType::kFloat16;
    case at::kBFloat16: return cuda::KgsDType::kBFloat16;
    default: TORCH_CHECK(false, "mim_fast::kgs_loss (cuda): tensors must be float32, float16 or bfloat16, got ", t);
  }
}
#endif

// ---------------------------------------------------------------------------------------------------
// Op entry points
// ---------------------------------------------------------------------------------------------------
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor>;

ForwardOptions make_options(bool per_sample, double kd_scale, bool kd_divide_T, at::ArrayRef<double> weights,
                            c10::string_view reduction, double eps, bool grad_preds, bool grad_h) {
  ForwardOptions o{};
  o.per_sample = per_sample;
  o.divide_T = kd_divide_T;
  o.grad_preds = grad_preds;
  o.grad_h = grad_h;
  o.reduction = parse_reduction(reduction);
  o.kd_scale = kd_scale;
  o.eps = eps;
  for (int k = 0; k < 4; ++k) o.w[k] = weights[k];
  return o;
}

// The CPU forward of both ops: yk_a, yu_a, y_a in the compute dtype (yk_a/yu_a undefined with heads).
ForwardResult forward_cpu_op(const at::Tensor& yk_a, const at::Tensor& yu_a, const at::Tensor& y_a, const at::Tensor& h,
                             const Heads* heads, const ForwardOptions& o, at::ScalarType out_t, at::ScalarType acc) {
  const int64_t M = h.size(0), B = h.size(1), D = h.size(2);
  const auto acc_opts = h.options().dtype(acc);
  at::Tensor teacher = at::empty({B}, h.options().dtype(at::kLong));
  at::Tensor saved_preds = o.grad_preds ? at::empty({4, M, B}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor saved_h = o.grad_h ? empty_large({M, B, D}, h.options()) : at::empty({0}, h.options());
  at::Tensor terms = at::empty({5, B}, acc_opts);
  at::Tensor alpha = at::empty({M, B}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "kgs_loss_forward_cpu", [&] {
    if (acc == at::kDouble) {
      forward_cpu<scalar_t, double>(yk_a, yu_a, y_a, h, heads, o, terms, teacher, alpha, saved_preds, saved_h);
    } else {
      forward_cpu<scalar_t, float>(yk_a, yu_a, y_a, h, heads, o, terms, teacher, alpha, saved_preds, saved_h);
    }
  });
  std::vector<at::Tensor> outs(5);
  if (o.reduction == kNone) {
    for (int k = 0; k < 5; ++k) outs[k] = terms[k].to(out_t, false, /*copy=*/true);  // outputs may not alias
  } else {
    // Sums in double, sample order: deterministic for any thread count.
    AT_DISPATCH_FLOATING_TYPES(acc, "kgs_loss_reduce_cpu", [&] {
      const scalar_t* p = terms.data_ptr<scalar_t>();
      for (int k = 0; k < 5; ++k) {
        double total = 0.0;
        for (int64_t i = 0; i < B; ++i) total += static_cast<double>(p[k * B + i]);
        if (o.reduction == kMean) total /= static_cast<double>(B);
        outs[k] = at::scalar_tensor(static_cast<scalar_t>(total), acc_opts).to(out_t);
      }
    });
  }
  return {outs[0], outs[1], outs[2], outs[3], outs[4], teacher, alpha.to(out_t), saved_preds, saved_h};
}

ForwardResult kgs_loss_forward(const at::Tensor& yk, const at::Tensor& yu, const at::Tensor& y, const at::Tensor& h,
                               bool per_sample, double kd_scale, bool kd_divide_T, at::ArrayRef<double> weights,
                               c10::string_view reduction, double eps, bool grad_preds, bool grad_h) {
  const Shapes s = check_forward_args(yk, yu, y, h, weights, kd_scale, eps);
  const int64_t M = s.M, B = s.B, D = s.D;
  const ForwardOptions o = make_options(per_sample, kd_scale, kd_divide_T, weights, reduction, eps, grad_preds, grad_h);
  const at::ScalarType out_t =
      at::promote_types(at::promote_types(yk.scalar_type(), yu.scalar_type()), at::promote_types(y.scalar_type(), h.scalar_type()));
  const at::ScalarType acc = out_t == at::kDouble ? at::kDouble : at::kFloat;

  if (h.is_cpu()) {
    // The (M, B)-sized inputs are converted once to the compute type (negligible next to h).
    return forward_cpu_op(yk.to(acc).contiguous(), yu.to(acc).contiguous(), y.to(acc).contiguous(), h, nullptr, o,
                          out_t, acc);
  }
  const auto acc_opts = h.options().dtype(acc);
  at::Tensor teacher = at::empty({B}, h.options().dtype(at::kLong));
  at::Tensor saved_preds = grad_preds ? at::empty({4, M, B}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor saved_h = grad_h ? at::empty({M, B, D}, h.options()) : at::empty({0}, h.options());
  const std::vector<int64_t> term_shape = o.reduction == kNone ? std::vector<int64_t>{B} : std::vector<int64_t>{};

#if MIM_FAST_WITH_CUDA
  TORCH_CHECK(h.is_cuda(), "mim_fast::kgs_loss: unsupported device ", h.device());
  TORCH_CHECK(acc == at::kFloat, "mim_fast::kgs_loss (cuda): float64 is supported on the CPU only");
  const c10::cuda::CUDAGuard guard(h.device());
  const auto out_opts = h.options().dtype(out_t);
  std::vector<at::Tensor> outs(5);
  for (int k = 0; k < 5; ++k) outs[k] = at::empty(term_shape, out_opts);
  at::Tensor alpha = at::empty({M, B}, out_opts);
  cuda::KgsForwardArgs a{};
  a.M = M; a.B = B; a.D = D;
  a.yk = yk.data_ptr(); a.yk_t = kgs_dtype(yk.scalar_type()); a.yk_sM = yk.stride(0); a.yk_sB = yk.stride(1);
  a.yu = yu.data_ptr(); a.yu_t = kgs_dtype(yu.scalar_type()); a.yu_sM = yu.stride(0); a.yu_sB = yu.stride(1);
  a.y = y.data_ptr(); a.y_t = kgs_dtype(y.scalar_type()); a.y_s = y.stride(0);
  a.h = h.data_ptr(); a.h_t = kgs_dtype(h.scalar_type()); a.hM = h.stride(0); a.hB = h.stride(1); a.hD = h.stride(2);
  a.per_sample = per_sample;
  a.divide_T = kd_divide_T;
  a.reduction = o.reduction;
  a.kd_scale = static_cast<float>(kd_scale);
  a.eps = static_cast<float>(eps);
  a.scale = o.reduction == kMean ? static_cast<float>(1.0 / static_cast<double>(B)) : 1.0f;
  for (int k = 0; k < 4; ++k) a.w[k] = static_cast<float>(weights[k]);
  for (int k = 0; k < 5; ++k) a.terms[k] = outs[k].data_ptr();
  a.out_t = kgs_dtype(out_t);
  a.teacher = teacher.data_ptr<int64_t>();
  a.alpha = alpha.data_ptr();
  a.grad_preds = grad_preds ? saved_preds.data_ptr<float>() : nullptr;
  a.grad_h = grad_h ? saved_h.data_ptr() : nullptr;
  at::Tensor workspace =
      at::empty({cuda::kgs_loss_forward_workspace_bytes(M, B, per_sample, o.reduction != kNone)}, h.options().dtype(at::kByte));
  a.workspace = workspace.data_ptr();
  const cudaError_t err = cuda::kgs_loss_forward(a, at::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "mim_fast::kgs_loss_forward: CUDA launch failed: ", cudaGetErrorString(err));
  return {outs[0], outs[1], outs[2], outs[3], outs[4], teacher, alpha, saved_preds, saved_h};
#else
  TORCH_CHECK(false, "mim_fast::kgs_loss: this build has no CUDA kernels");
#endif
}

using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

BackwardResult kgs_loss_backward(const c10::optional<at::Tensor>& grad_loss, const c10::optional<at::Tensor>& grad_intra,
                                 const c10::optional<at::Tensor>& grad_inter,
                                 const c10::optional<at::Tensor>& grad_masked,
                                 const c10::optional<at::Tensor>& grad_unmasked, const at::Tensor& saved_preds,
                                 const at::Tensor& saved_h, at::ArrayRef<double> weights, at::ScalarType yk_dtype,
                                 at::ScalarType yu_dtype, at::ScalarType y_dtype) {
  TORCH_CHECK(weights.size() == 4, "mim_fast::kgs_loss_backward: weights must be 4 numbers");
  const bool has_preds = saved_preds.numel() > 0, has_h = saved_h.numel() > 0;
  TORCH_CHECK(!has_preds || (saved_preds.dim() == 3 && saved_preds.size(0) == 4),
              "mim_fast::kgs_loss_backward: saved prediction gradients must be (4, M, B)");
  TORCH_CHECK(!has_h || saved_h.dim() == 3, "mim_fast::kgs_loss_backward: saved h gradient must be (M, B, D)");
  const int64_t M = has_preds ? saved_preds.size(1) : (has_h ? saved_h.size(0) : 0);
  const int64_t B = has_preds ? saved_preds.size(2) : (has_h ? saved_h.size(1) : 0);
  TORCH_CHECK(!(has_preds && has_h) || (saved_h.size(0) == M && saved_h.size(1) == B),
              "mim_fast::kgs_loss_backward: saved gradients disagree on (M, B)");
  const at::Device dev = has_preds ? saved_preds.device() : saved_h.device();
  const at::ScalarType acc = has_preds ? saved_preds.scalar_type()
                                       : (saved_h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const c10::optional<at::Tensor>* gs[5] = {&grad_loss, &grad_intra, &grad_inter, &grad_masked, &grad_unmasked};
  for (int k = 0; k < 5; ++k) {
    if (!gs[k]->has_value()) continue;
    const at::Tensor& g = gs[k]->value();
    TORCH_CHECK(g.dim() == 0 || (g.dim() == 1 && g.size(0) == B),
                "mim_fast::kgs_loss_backward: incoming gradients must be scalars or (B,), got ", g.sizes());
    TORCH_CHECK(g.device() == dev, "mim_fast::kgs_loss_backward: incoming gradient on ", g.device(), ", expected ", dev);
  }
  const auto opts = at::TensorOptions().device(dev);
  at::Tensor gyk = has_preds ? at::empty({M, B}, opts.dtype(acc)) : at::empty({0}, opts.dtype(yk_dtype));
  at::Tensor gyu = has_preds ? at::empty({M, B}, opts.dtype(acc)) : at::empty({0}, opts.dtype(yu_dtype));
  at::Tensor gy = has_preds ? at::empty({B}, opts.dtype(acc)) : at::empty({0}, opts.dtype(y_dtype));
  at::Tensor gh = has_h ? empty_large(saved_h.sizes(), saved_h.options()) : at::empty({0}, opts.dtype(saved_h.scalar_type()));

  if (dev.is_cpu()) {
    std::vector<at::Tensor> g_acc(5);  // kept alive while the kernel reads them
    AT_DISPATCH_FLOATING_TYPES(acc, "kgs_loss_backward_cpu", [&] {
      using A = scalar_t;
      Upstream<A> up{};
      for (int k = 0; k < 5; ++k) {
        if (gs[k]->has_value()) {
          g_acc[k] = gs[k]->value().to(acc);
          up.g[k] = g_acc[k].data_ptr<A>();
          up.stride[k] = g_acc[k].dim() == 0 ? 0 : g_acc[k].stride(0);  // expanded gradients have stride 0
        }
      }
      for (int k = 0; k < 4; ++k) up.w[k] = static_cast<A>(weights[k]);
      if (has_preds) {
        const at::Tensor sp = saved_preds.contiguous();
        backward_preds_cpu<A>(up, sp.data_ptr<A>(), M, B, gyk.data_ptr<A>(), gyu.data_ptr<A>(), gy.data_ptr<A>());
      }
      if (has_h) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved_h.scalar_type(), "kgs_loss_backward_h_cpu", [&] {
          backward_h_cpu<scalar_t, A>(up, saved_h.contiguous(), gh);
        });
      }
    });
    return {gyk.to(yk_dtype), gyu.to(yu_dtype), gy.to(y_dtype), gh};
  }

#if MIM_FAST_WITH_CUDA
  TORCH_CHECK(dev.is_cuda(), "mim_fast::kgs_loss_backward: unsupported device ", dev);
  TORCH_CHECK(acc == at::kFloat, "mim_fast::kgs_loss_backward (cuda): float64 is supported on the CPU only");
  const c10::cuda::CUDAGuard guard(dev);
  if (has_preds) {  // written directly in the inputs' dtypes
    gyk = at::empty({M, B}, opts.dtype(yk_dtype));
    gyu = at::empty({M, B}, opts.dtype(yu_dtype));
    gy = at::empty({B}, opts.dtype(y_dtype));
  }
  cuda::KgsBackwardArgs a{};
  a.M = M; a.B = B; a.D = has_h ? saved_h.size(2) : 0;
  for (int k = 0; k < 5; ++k) {
    if (gs[k]->has_value()) {
      const at::Tensor& g = gs[k]->value();
      a.g[k] = g.data_ptr();
      a.g_t[k] = kgs_dtype(g.scalar_type());
      a.g_s[k] = g.dim() == 0 ? 0 : g.stride(0);
    }
  }
  for (int k = 0; k < 4; ++k) a.w[k] = static_cast<float>(weights[k]);
  const at::Tensor sp = has_preds ? saved_preds.contiguous() : saved_preds;
  const at::Tensor sh = has_h ? saved_h.contiguous() : saved_h;
  a.saved_preds = has_preds ? sp.data_ptr<float>() : nullptr;
  a.saved_h = has_h ? sh.data_ptr() : nullptr;
  a.h_t = has_h ? kgs_dtype(sh.scalar_type()) : cuda::KgsDType::kFloat32;
  a.grad_yk = has_preds ? gyk.data_ptr() : nullptr;
  a.grad_yu = has_preds ? gyu.data_ptr() : nullptr;
  a.grad_y = has_preds ? gy.data_ptr() : nullptr;
  a.yk_t = has_preds ? kgs_dtype(yk_dtype) : cuda::KgsDType::kFloat32;
  a.yu_t = has_preds ? kgs_dtype(yu_dtype) : cuda::KgsDType::kFloat32;
  a.y_t = has_preds ? kgs_dtype(y_dtype) : cuda::KgsDType::kFloat32;
  a.grad_h = has_h ? gh.data_ptr() : nullptr;
  if (M * B > 0) {
    const cudaError_t err = cuda::kgs_loss_backward(a, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "mim_fast::kgs_loss_backward: CUDA launch failed: ", cudaGetErrorString(err));
  }
  return {gyk, gyu, gy, gh};
#else
  TORCH_CHECK(false, "mim_fast::kgs_loss: this build has no CUDA kernels");
#endif
}

// ---------------------------------------------------------------------------------------------------
// kgs_loss_with_heads (CPU): the predictions come from MIM's per-modality heads inside the fused pass,
// yk[m, i] = h_masked[m, i]·weight[m] + bias[m], yu[m, i] = h_unmasked[m, i]·weight[m] + bias[m].
// Forward: h_masked and h_unmasked read once (per_sample=True; per_sample=False reads h_masked twice:
// once for the predictions the batch means need, once in the fused pass). Backward: one pass reading
// h_masked, h_unmasked and the saved ∂inter/∂h, writing their gradients; the weight/bias gradients are
// reduced over fixed sample chunks, then over the chunks in order (deterministic).
// ---------------------------------------------------------------------------------------------------
int pred_round_for(at::ScalarType pred_t, at::ScalarType acc) {
  if (pred_t == at::kHalf) return kRoundHalf;
  if (pred_t == at::kBFloat16) return kRoundBFloat16;
  if (pred_t == at::kFloat && acc == at::kDouble) return kRoundFloat;
  return kRoundNone;
}

ForwardResult kgs_loss_heads_forward(const at::Tensor& h_masked, const at::Tensor& h_unmasked, const at::Tensor& weight,
                                     const at::Tensor& bias, const at::Tensor& y, bool per_sample, double kd_scale,
                                     bool kd_divide_T, at::ArrayRef<double> weights, c10::string_view reduction,
                                     double eps, bool grad_preds, bool grad_h) {
  TORCH_CHECK(h_masked.dim() == 3 && h_masked.size(0) >= 2 && h_masked.size(1) >= 1 && h_masked.size(2) >= 1,
              "mim_fast::kgs_loss_with_heads: h_masked must be (M, B, D) with M >= 2, B >= 1, D >= 1, got ",
              h_masked.sizes());
  const int64_t M = h_masked.size(0), B = h_masked.size(1), D = h_masked.size(2);
  TORCH_CHECK(h_unmasked.sizes() == h_masked.sizes() && h_unmasked.scalar_type() == h_masked.scalar_type(),
              "mim_fast::kgs_loss_with_heads: h_unmasked must match h_masked's shape and dtype");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == M && weight.size(1) == D,
              "mim_fast::kgs_loss_with_heads: weight must be (M, D)");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == M, "mim_fast::kgs_loss_with_heads: bias must be (M,)");
  TORCH_CHECK(y.dim() == 1 && y.size(0) == B, "mim_fast::kgs_loss_with_heads: y must be (B,)");
  for (const at::Tensor* t : {&h_masked, &h_unmasked, &weight, &bias, &y}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "mim_fast::kgs_loss_with_heads: inputs must be floating point");
    TORCH_CHECK(t->device() == h_masked.device(), "mim_fast::kgs_loss_with_heads: all inputs must be on one device");
  }
  TORCH_CHECK(weights.size() == 4, "mim_fast::kgs_loss_with_heads: weights must be 4 numbers");
  TORCH_CHECK(kd_scale > 0 && std::isfinite(kd_scale) && eps > 0 && std::isfinite(eps),
              "mim_fast::kgs_loss_with_heads: kd_scale and eps must be finite and > 0");
  const ForwardOptions o = make_options(per_sample, kd_scale, kd_divide_T, weights, reduction, eps, grad_preds, grad_h);
  const at::ScalarType pred_t = at::promote_types(at::promote_types(h_masked.scalar_type(), h_unmasked.scalar_type()),
                                                  at::promote_types(weight.scalar_type(), bias.scalar_type()));
  const at::ScalarType out_t = at::promote_types(pred_t, y.scalar_type());
  const at::ScalarType acc = out_t == at::kDouble ? at::kDouble : at::kFloat;
  const Heads heads{h_unmasked, weight.to(acc).contiguous(), bias.to(acc).contiguous(), pred_round_for(pred_t, acc)};
  return forward_cpu_op(at::Tensor(), at::Tensor(), y.to(acc).contiguous(), h_masked, &heads, o, out_t, acc);
}

template <typename scalar_t, typename A>
struct HeadsBackwardCpu {
  int64_t M, B, D;
  const A* saved;       // (4, M, B)
  const scalar_t* gh;   // (M, B, D) contiguous saved ∂inter/∂h_masked, or null
  const scalar_t* hm;   // h_masked, strides mM, mB, mD
  const scalar_t* hu;   // h_unmasked, strides uM, uB, uD
  int64_t mM, mB, mD, uM, uB, uD;
  const A* w;           // (M, D) contiguous
  bool intra_on, yk_on, yu_on, inter_on;
  scalar_t* ghm;        // (M, B, D) contiguous or null
  scalar_t* ghu;
  A* gw_part;           // (nchunks, M, D) or null
  A* gb_part;           // (nchunks, M) or null
  A* gy;                // (B,) or null
};

template <typename scalar_t, typename A>
void heads_backward_chunk(const HeadsBackwardCpu<scalar_t, A>& a, const Upstream<A>& up, int64_t chunk, int64_t i0,
                          int64_t i1) {
  const int64_t M = a.M, B = a.B, D = a.D;
  A* pw = a.gw_part ? a.gw_part + chunk * M * D : nullptr;
  A* pb = a.gb_part ? a.gb_part + chunk * M : nullptr;
  if (pw) for (int64_t k = 0; k < M * D; ++k) pw[k] = A(0);
  if (pb) for (int64_t m = 0; m < M; ++m) pb[m] = A(0);
  for (int64_t i = i0; i < i1; ++i) {
    const A c_intra = up.factor(kIntra, i), c_inter = up.factor(kInter, i);
    const A c_masked = up.factor(kMasked, i), c_unmasked = up.factor(kUnmasked, i);
    A sk = A(0), su = A(0);
    for (int64_t m = 0; m < M; ++m) {
      const A ik = a.intra_on ? a.saved[(kIntraYk * M + m) * B + i] : A(0);
      const A iu = a.intra_on ? a.saved[(kIntraYu * M + m) * B + i] : A(0);
      const A mk = a.saved[(kMaskedYk * M + m) * B + i], mu = a.saved[(kUnmaskedYu * M + m) * B + i];
      sk += mk;
      su += mu;
      // ∂L/∂yk and ∂L/∂yu of this (m, i); a path no gradient reached contributes nothing at all (not
      // 0·w), as in the reference's graph.
      const A gk = c_intra * ik + c_masked * mk, gu = c_intra * iu + c_unmasked * mu;
      const A* w = a.w + m * D;
      const scalar_t* hm = a.hm + m * a.mM + i * a.mB;
      const scalar_t* hu = a.hu + m * a.uM + i * a.uB;
      if (a.ghm) {
        scalar_t* o = a.ghm + (m * B + i) * D;
        const scalar_t* g = a.gh ? a.gh + (m * B + i) * D : nullptr;
        if (a.yk_on && a.inter_on) {
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(gk * w[d] + c_inter * static_cast<A>(g[d]));
        } else if (a.yk_on) {
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(gk * w[d]);
        } else if (a.inter_on) {
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(c_inter * static_cast<A>(g[d]));
        } else {
          for (int64_t d = 0; d < D; ++d) o[d] = scalar_t(0);
        }
      }
      if (a.ghu) {
        scalar_t* o = a.ghu + (m * B + i) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(gu * w[d]);
      }
      if (pw) {
        A* p = pw + m * D;
        if (a.yk_on) for (int64_t d = 0; d < D; ++d) p[d] += gk * static_cast<A>(hm[d * a.mD]);
        if (a.yu_on) for (int64_t d = 0; d < D; ++d) p[d] += gu * static_cast<A>(hu[d * a.uD]);
      }
      if (pb) pb[m] += (a.yk_on ? gk : A(0)) + (a.yu_on ? gu : A(0));
    }
    if (a.gy) a.gy[i] = -(c_masked * sk + c_unmasked * su);
  }
}

using HeadsBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

HeadsBackwardResult kgs_loss_heads_backward(
    const c10::optional<at::Tensor>& grad_loss, const c10::optional<at::Tensor>& grad_intra,
    const c10::optional<at::Tensor>& grad_inter, const c10::optional<at::Tensor>& grad_masked,
    const c10::optional<at::Tensor>& grad_unmasked, const at::Tensor& saved_preds, const at::Tensor& saved_h,
    const at::Tensor& h_masked, const at::Tensor& h_unmasked, const at::Tensor& weight, at::ArrayRef<double> weights,
    std::array<bool, 5> needs, at::ScalarType bias_dtype, at::ScalarType y_dtype) {
  TORCH_CHECK(weights.size() == 4, "mim_fast::kgs_loss_heads_backward: weights must be 4 numbers");
  const int64_t M = h_masked.size(0), B = h_masked.size(1), D = h_masked.size(2);
  TORCH_CHECK(saved_preds.dim() == 3 && saved_preds.size(0) == 4 && saved_preds.size(1) == M && saved_preds.size(2) == B,
              "mim_fast::kgs_loss_heads_backward: saved prediction gradients must be (4, M, B)");
  TORCH_CHECK(!needs[0] || (saved_h.dim() == 3 && saved_h.size(0) == M && saved_h.size(1) == B && saved_h.size(2) == D),
              "mim_fast::kgs_loss_heads_backward: ∂L/∂h_masked needs the saved (M, B, D) inter gradient");
  const c10::optional<at::Tensor>* gs[5] = {&grad_loss, &grad_intra, &grad_inter, &grad_masked, &grad_unmasked};
  const bool has[5] = {grad_loss.has_value(), grad_intra.has_value(), grad_inter.has_value(), grad_masked.has_value(),
                       grad_unmasked.has_value()};
  const at::ScalarType acc = saved_preds.scalar_type();
  const auto h_opts = h_masked.options();
  const auto acc_opts = h_masked.options().dtype(acc);
  at::Tensor ghm = needs[0] ? empty_large({M, B, D}, h_opts) : at::empty({0}, h_opts);
  at::Tensor ghu = needs[1] ? empty_large({M, B, D}, h_opts) : at::empty({0}, h_opts);
  const int64_t chunk = std::max<int64_t>(16, (B + 255) / 256);  // fixed by B: deterministic partials
  const int64_t nchunks = (B + chunk - 1) / chunk;
  at::Tensor gw_part = needs[2] ? at::empty({nchunks, M, D}, acc_opts) : at::Tensor();
  at::Tensor gb_part = needs[3] ? at::empty({nchunks, M}, acc_opts) : at::Tensor();
  at::Tensor gy = needs[4] ? at::empty({B}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor gw, gb;
  AT_DISPATCH_FLOATING_TYPES(acc, "kgs_loss_heads_backward_cpu", [&] {
    using A = scalar_t;
    std::vector<at::Tensor> g_acc(5);
    Upstream<A> up{};
    for (int k = 0; k < 5; ++k) {
      if (has[k]) {
        g_acc[k] = gs[k]->value().to(acc);
        up.g[k] = g_acc[k].data_ptr<A>();
        up.stride[k] = g_acc[k].dim() == 0 ? 0 : g_acc[k].stride(0);
      }
    }
    for (int k = 0; k < 4; ++k) up.w[k] = static_cast<A>(weights[k]);
    const at::Tensor sp = saved_preds.contiguous();
    const at::Tensor sh = needs[0] && saved_h.numel() > 0 ? saved_h.contiguous() : at::Tensor();
    const at::Tensor w_a = weight.to(acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_masked.scalar_type(), "kgs_loss_heads_backward_h", [&] {
      HeadsBackwardCpu<scalar_t, A> a{};
      a.M = M; a.B = B; a.D = D;
      a.saved = sp.data_ptr<A>();
      a.gh = sh.defined() ? sh.data_ptr<scalar_t>() : nullptr;
      a.hm = h_masked.data_ptr<scalar_t>(); a.hu = h_unmasked.data_ptr<scalar_t>();
      a.mM = h_masked.stride(0); a.mB = h_masked.stride(1); a.mD = h_masked.stride(2);
      a.uM = h_unmasked.stride(0); a.uB = h_unmasked.stride(1); a.uD = h_unmasked.stride(2);
      a.w = w_a.data_ptr<A>();
      a.intra_on = has[kIntra] || has[kLoss];
      a.yk_on = a.intra_on || has[kMasked];
      a.yu_on = a.intra_on || has[kUnmasked];
      a.inter_on = (has[kInter] || has[kLoss]) && a.gh != nullptr;
      a.ghm = needs[0] ? ghm.data_ptr<scalar_t>() : nullptr;
      a.ghu = needs[1] ? ghu.data_ptr<scalar_t>() : nullptr;
      a.gw_part = needs[2] ? gw_part.data_ptr<A>() : nullptr;
      a.gb_part = needs[3] ? gb_part.data_ptr<A>() : nullptr;
      a.gy = needs[4] ? gy.data_ptr<A>() : nullptr;
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) heads_backward_chunk(a, up, c, c * chunk, std::min(B, (c + 1) * chunk));
      });
    });
    // The chunk partials, summed in chunk order.
    if (needs[2]) {
      gw = at::empty({M, D}, acc_opts);
      const A* p = gw_part.data_ptr<A>();
      A* o = gw.data_ptr<A>();
      at::parallel_for(0, M * D, 1024, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          A total = A(0);
          for (int64_t c = 0; c < nchunks; ++c) total += p[c * M * D + k];
          o[k] = total;
        }
      });
    }
    if (needs[3]) {
      gb = at::empty({M}, acc_opts);
      const A* p = gb_part.data_ptr<A>();
      for (int64_t m = 0; m < M; ++m) {
        A total = A(0);
        for (int64_t c = 0; c < nchunks; ++c) total += p[c * M + m];
        gb.data_ptr<A>()[m] = total;
      }
    }
  });
  if (!needs[2]) gw = at::empty({0}, weight.options());
  if (!needs[3]) gb = at::empty({0}, acc_opts);
  return {ghm, ghu, gw.to(weight.scalar_type()), gb.to(bias_dtype), gy.to(y_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mim_fast, CPU, m) {
  m.impl("kgs_loss_forward", &kgs_loss_forward);
  m.impl("kgs_loss_backward", &kgs_loss_backward);
  m.impl("kgs_loss_heads_forward", &kgs_loss_heads_forward);
  m.impl("kgs_loss_heads_backward", &kgs_loss_heads_backward);
}

#if MIM_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mim_fast, CUDA, m) {
  m.impl("kgs_loss_forward", &kgs_loss_forward);
  m.impl("kgs_loss_backward", &kgs_loss_backward);
}
#endif

}  // namespace mim_fast
