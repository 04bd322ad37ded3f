// The scalar math of the KGS loss (SPEC §2) shared by the C++ CPU kernel (csrc/kgs_loss.cpp) and the
// CUDA kernel (kernels/kgs_loss.cu); the Triton kernel (mim_fast/triton/kgs_loss.py) transcribes it.
//
// Pure functions of their arguments, host and device (MIM_HD from mim_math.h), no torch. Every formula
// follows mim_fast/reference.py operation for operation (same operands, same order), so the routing
// decisions (strict comparisons of the same rounded errors) are identical to the reference's and the
// values differ from it only by the summation order of the reductions.
#pragma once

#include <stdint.h>

#include "mim_math.h"

namespace mim_fast {
namespace kgs {

// sign with sign(±0) = 0 and sign(NaN) = 0: torch.sign, and so the derivative autograd gives |x|.
template <typename T>
MIM_HD T sign0(T x) {
  return static_cast<T>(x > T(0)) - static_cast<T>(x < T(0));
}

// Intra-modal routing of modality m of one sample, from its (possibly batch-mean) errors:
// +1 = I (masked branch strictly better: it teaches the unmasked one), −1 = J (the reverse),
// 0 = tie or a NaN error (comparisons with NaN are false): no transfer.
enum IntraDirection : int { kMaskedTeaches = 1, kNoTransfer = 0, kUnmaskedTeaches = -1 };

template <typename T>
MIM_HD int intra_direction(T rk, T ru) {
  return rk < ru ? kMaskedTeaches : (rk > ru ? kUnmaskedTeaches : kNoTransfer);
}

// The per-modality contributions of one (m, i) to the intra term and to its per-sample gradients:
//   value = (yk − yu)² when a transfer happens, else 0 (where(), not a product with a 0/1 mask: a
//           NaN/inf on the unselected side stays out of the value, exactly like the reference);
//   d_yk  = (J ? scale : 0)·2(yk − yu),  d_yu = (I ? scale : 0)·2(yu − yk)   (scale: 1/B or 1).
// The gradients are written as the reference's autograd computes them — where() masks the incoming
// gradient, then pow's backward multiplies it by 2·(yk − yu) — so a non-finite difference gives NaN
// even without a transfer (0·NaN), as it does in the reference.
template <typename T>
struct IntraTerm {
  T value, d_yk, d_yu;
};

template <typename T>
MIM_HD IntraTerm<T> intra_term(T yk, T yu, int direction, T scale) {
  const T diff = yk - yu;
  IntraTerm<T> out;
  out.value = direction != kNoTransfer ? diff * diff : T(0);
  out.d_yk = (direction == kUnmaskedTeaches ? scale : T(0)) * (T(2) * diff);
  out.d_yu = (direction == kMaskedTeaches ? scale : T(0)) * (T(2) * (yu - yk));
  return out;
}

// The teacher: the modality whose error is strictly lowest. Scanned in modality order from the empty
// state; a tie for the minimum (count > 1) or any NaN error (torch.min would return NaN and nothing
// equals it) gives none. An error of +inf in modality 0 counts like any value (+inf == +inf).
template <typename T>
struct TeacherScan {
  T best;
  int64_t index;
  int64_t count;
  bool any_nan;

  MIM_HD static TeacherScan empty() {
    TeacherScan s;
    s.best = static_cast<T>(INFINITY);
    s.index = 0;
    s.count = 0;
    s.any_nan = false;
    return s;
  }
  MIM_HD void add(T r, int64_t m) {
    if (r != r) {
      any_nan = true;
    } else if (r < best) {
      best = r;
      index = m;
      count = 1;
    } else if (r == best) {
      ++count;
    }
  }
  MIM_HD int64_t teacher() const { return (!any_nan && count == 1) ? index : -1; }
};

// The MIM Adjuster, α[m] = M·(1+λ[m])⁻¹ / Σ_n (1+λ[n])⁻¹ with λ[m] = r[m] / (Σ_n r[n] + ε), split in the
// two steps a kernel needs: first every inv[m] from Σ r, then α[m] from Σ inv.
template <typename T>
MIM_HD T adjuster_inv(T r, T sum_r, T eps) {
  const T lambda = r / (sum_r + eps);
  return T(1) / (T(1) + lambda);
}

template <typename T>
MIM_HD T adjuster_alpha(T inv, T sum_inv, int64_t M) {
  return static_cast<T>(M) * inv / sum_inv;
}

// Distillation constants of a sample with teacher t: T_i = kd_scale·α[t], the softmax temperature
// s_i (T_i with kd_divide_T, else 1), the factor ½T_i² of the KL sum, and the coefficient of the
// h-gradient, ½T_i²·scale/s_i (∂inter/∂h[m] = ½T²·(q_m − p)/s for each student m).
template <typename T>
struct Distill {
  T kd_T, inv_s, half_T2, grad_coef;
};

template <typename T>
MIM_HD Distill<T> distill_constants(T kd_scale, T alpha_teacher, bool divide_T, T scale) {
  Distill<T> d;
  d.kd_T = kd_scale * alpha_teacher;
  const T s = divide_T ? d.kd_T : T(1);
  d.inv_s = T(1) / s;
  d.half_T2 = T(0.5) * (d.kd_T * d.kd_T);
  d.grad_coef = d.half_T2 * scale / s;
  return d;
}

// Softmax bookkeeping over D (log-sum-exp with the maximum subtracted).
//
// A partial state is (mx, sum) with sum = Σ exp(x − mx) over the elements seen; the empty state is
// (−inf, 0). An element −inf adds exp(−inf) = 0 (it must not meet mx = −inf: −inf − (−inf) is NaN);
// NaN propagates into sum and from there into every KL of the row, as in torch's log_softmax. A row
// of all −inf ends as (−inf, 0): log 0 = −inf and z = x − mx = NaN, torch's NaN as well.
template <typename T>
MIM_HD void softmax_add(T& mx, T& sum, T x) {
  if (x > mx) {
    sum = sum * math::exp_<T>(mx - x) + T(1);  // first element: 0·exp(−inf) + 1 = 1
    mx = x;
  } else if (x != -static_cast<T>(INFINITY)) {
    sum += math::exp_<T>(x - mx);
  }
}

// Merges the partial state (mx2, sum2) into (mx, sum). An empty partial (sum = 0; a non-empty one has
// sum ≥ 1) contributes nothing: rescaling it would compute exp(−inf − (−inf)) = NaN.
template <typename T>
MIM_HD void softmax_merge(T& mx, T& sum, T mx2, T sum2) {
  const T m = mx2 > mx ? mx2 : mx;
  const T a = sum == T(0) ? T(0) : sum * math::exp_<T>(mx - m);
  const T b = sum2 == T(0) ? T(0) : sum2 * math::exp_<T>(mx2 - m);
  sum = a + b;
  mx = sum == T(0) ? mx : m;
}

// One feature d of one student: the KL summand p·(log p − log q) and the unscaled h-gradient q − p.
// kl_element takes z = x − max of both rows and their log Σ exp(z) and exponentiates; kl_from_probs
// takes p and q already computed (the CPU kernel keeps exp(z) from the statistics pass, p = e·(1/Σe)).
// Written as the reference writes it (not the simplified Σ p·(x_t − x_m) + lse_m − lse_t), so inf and
// NaN propagate identically (p = 0 with log p = −inf gives NaN, as torch's 0·(−inf)).
template <typename T>
struct KLElement {
  T kl, q_minus_p;
};

template <typename T>
MIM_HD KLElement<T> kl_from_probs(T p, T log_p, T q, T log_q) {
  KLElement<T> e;
  e.kl = p * (log_p - log_q);
  e.q_minus_p = q - p;
  return e;
}

template <typename T>
MIM_HD KLElement<T> kl_element(T z_teacher, T log_sum_teacher, T z_student, T log_sum_student) {
  const T log_p = z_teacher - log_sum_teacher;
  const T log_q = z_student - log_sum_student;
  return kl_from_probs<T>(math::exp_<T>(log_p), log_p, math::exp_<T>(log_q), log_q);
}

// The per-sample loss from its terms, in the reference's order: w0·intra + w1·inter + w2·masked + w3·unmasked.
template <typename T>
MIM_HD T weighted_loss(const T* w, T intra, T inter, T masked, T unmasked) {
  return w[0] * intra + w[1] * inter + w[2] * masked + w[3] * unmasked;
}

// Backward: the per-term chain factor of one sample, c_k = G_k + w_k·G_loss (the loss is the weighted
// sum of the terms, so its incoming gradient folds into each term's).
template <typename T>
MIM_HD T chain_factor(T g_term, T w, T g_loss) {
  return g_term + w * g_loss;
}

}  // namespace kgs
}  // namespace mim_fast
