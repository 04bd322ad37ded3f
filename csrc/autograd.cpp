// Autograd of the fused C++ ops (CPU and CUDA kernels), registered to the Autograd dispatch key.
//
// At MIM's size a call's arithmetic is a few µs; what costs is the host path around it. A Python
// autograd wrapper (torch.library.register_autograd) runs a Python function and builds Python objects
// on every forward and backward; here the graph node is a C++ torch::autograd::Function, so neither
// direction runs Python. The math is unchanged: forward and backward call the same ops through the
// dispatcher (below autograd), so torch.compile, export and opcheck see the same custom ops, with the
// fakes registered in mim_fast/ops/. The Triton ops and kgs_loss_heads_forward keep their Python autograd
// (mim_fast/ops/*.py), which mirrors the logic here line for line. dropout_apply (the fused dropout kernel)
// is called directly by mim_fast.dropout's eager common call; compiled and exported graphs use the
// Python op mim_fast::dropout around it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>

namespace mim_fast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = c10::optional<Tensor>;

// backward(create_graph=True) (grad mode on while a backward runs) raises: the fused backward ops have no
// derivative of their own, and the gradients they return, computed from saved outputs, would pass for
// constants, so a second derivative through them would be silently missing (autograd.grad of a sum that
// also holds other terms would return those alone). torch.compile's own backward refuses double backward
// the same way; aot_autograd traces backwards with create_graph=False, so compiling is not affected. The
// Triton ops' Python autograd (mim_fast/ops/) does the same.
void check_no_create_graph(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "mim_fast.", op,
              ": backward with create_graph=True is not supported: the fused backward has no derivative of its "
              "own, so a second derivative through it would be missing. Use backend='torch' (the reference) for "
              "higher-order gradients");
}

// ---------------------------------------------------------------------------------------------------
// purify_gate_forward: outputs (pooled, penalty, gate, ste, dq, inv_count); gradients for x and logits.
// ---------------------------------------------------------------------------------------------------
using GateOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The op's typed handle, looked up once: for the autograd node below (under it) and for purify_gate_call
// (through it).
const c10::TypedOperatorHandle<GateOut(const Tensor&, const Tensor&, const Opt&, const Opt&, int64_t, int64_t,
                                       c10::string_view, c10::string_view, double, double, double, double, double,
                                       double)>&
gate_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mim_fast::purify_gate_forward", "")
                             .typed<GateOut(const Tensor&, const Tensor&, const Opt&, const Opt&, int64_t, int64_t,
                                            c10::string_view, c10::string_view, double, double, double, double,
                                            double, double)>();
  return op;
}

GateOut gate_forward_below_autograd(const Tensor& x, const Tensor& logits, const Opt& noise, const Opt& lengths,
                                    int64_t seed, int64_t offset, c10::string_view mode, c10::string_view activation,
                                    double loc_bias, double beta, double zeta_gamma, double gamma, double threshold,
                                    double pen_shift) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return gate_forward_op().call(x, logits, noise, lengths, seed, offset, mode, activation, loc_bias, beta,
                                zeta_gamma, gamma, threshold, pen_shift);
}

class PurifyGate : public torch::autograd::Function<PurifyGate> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& logits, const Opt& noise,
                               const Opt& lengths, int64_t seed, int64_t offset, c10::string_view mode,
                               c10::string_view activation, double loc_bias, double beta, double zeta_gamma,
                               double gamma, double threshold, double pen_shift) {
    auto [pooled, penalty, gate, ste, dq, inv_count] = gate_forward_below_autograd(
        x, logits, noise, lengths, seed, offset, mode, activation, loc_bias, beta, zeta_gamma, gamma, threshold,
        pen_shift);
    ctx->save_for_backward({x, gate, ste, dq, inv_count, lengths.value_or(Tensor())});
    ctx->saved_data["activation"] = std::string(activation);
    // The penalty depends on the logits alone: with logits that need no gradient it needs none either (as in
    // the reference), so that penalty.backward() then raises instead of writing zeros into x.grad.
    if (logits.requires_grad()) {
      ctx->mark_non_differentiable({gate, ste, dq, inv_count});
    } else {
      ctx->mark_non_differentiable({penalty, gate, ste, dq, inv_count});
    }
    // Gradients of unused outputs arrive undefined instead of as zero tensors the engine would allocate and
    // fill on every backward: the four non-differentiable outputs never get one, and that was four
    // allocations per call at MIM's size. backward() makes the two it reads when they are missing.
    ctx->set_materialize_grads(false);
    return {pooled, penalty, gate, ste, dq, inv_count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mim_fast::purify_gate_backward", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, const Tensor&, const Tensor&, const Opt&,
                                                           c10::string_view, bool)>();
    check_no_create_graph("purify_gate");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &gate = saved[1], &ste = saved[2], &dq = saved[3], &inv_count = saved[4];
    const Opt lengths = saved[5].defined() ? Opt(saved[5]) : Opt();
    const bool needs_x = ctx->needs_input_grad(0), needs_logits = ctx->needs_input_grad(1);
    variable_list out(14);
    if ((!needs_x && !needs_logits) || (!grads[0].defined() && !grads[1].defined())) return out;
    // ∂L/∂x only when x needs it: MIM's mask-learner update differentiates w.r.t. the logits alone, and
    // not writing ∂L/∂x saves a third of the backward's memory traffic.
    if (!grads[0].defined()) {
      // Only the penalty reached the loss: x gets no gradient (none flows from the penalty to it) and the
      // logits get ∂L/∂P·dq/n, the kernels' formula without its ste·Σ_d term, which is ste·0 here. No
      // feature pass: x is not read, so a NaN or inf feature cannot turn ste·0 into NaN where the reference
      // (autograd of the penalty alone) never looks at x.
      if (needs_logits) out[1] = dq.mul(grads[1].to(dq.scalar_type()).mul(inv_count));
      return out;
    }
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    // (only pooled reached the loss: the penalty's gradient is zero)
    const Tensor& grad_pooled = grads[0];
    const Tensor grad_penalty = grads[1].defined() ? grads[1] : at::zeros({}, gate.options());
    auto [grad_x, grad_logits] =
        op.call(grad_pooled, grad_penalty, x, gate, ste, dq, inv_count, lengths, activation, needs_x);
    if (needs_x) out[0] = grad_x;
    if (needs_logits) out[1] = grad_logits;
    return out;
  }
};

GateOut purify_gate_forward_autograd(const Tensor& x, const Tensor& logits, const Opt& noise, const Opt& lengths,
                                     int64_t seed, int64_t offset, c10::string_view mode, c10::string_view activation,
                                     double loc_bias, double beta, double zeta_gamma, double gamma, double threshold,
                                     double pen_shift) {
  const variable_list out = PurifyGate::apply(x, logits, noise, lengths, seed, offset, mode, activation, loc_bias,
                                              beta, zeta_gamma, gamma, threshold, pen_shift);
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

// ---------------------------------------------------------------------------------------------------
// kgs_loss_forward: outputs (loss, intra, inter, masked, unmasked, teacher, alpha, saved_preds, saved_h).
// The forward computed every term's gradient as it went (grad_preds / grad_h); the backward scales them by
// the incoming gradients of whichever terms were reached.
// ---------------------------------------------------------------------------------------------------
using KgsOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

class KgsLoss : public torch::autograd::Function<KgsLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& yk, const Tensor& yu, const Tensor& y,
                               const Tensor& h, bool per_sample, double kd_scale, bool kd_divide_T,
                               at::ArrayRef<double> weights, c10::string_view reduction, double eps, bool grad_preds,
                               bool grad_h) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mim_fast::kgs_loss_forward", "")
                         .typed<KgsOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, double, bool,
                                       at::ArrayRef<double>, c10::string_view, double, bool, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, intra, inter, masked, unmasked, teacher, alpha, saved_preds, saved_h] =
        op.call(yk, yu, y, h, per_sample, kd_scale, kd_divide_T, weights, reduction, eps, grad_preds, grad_h);
    ctx->save_for_backward({saved_preds, saved_h});
    ctx->saved_data["weights"] = std::vector<double>(weights.begin(), weights.end());
    ctx->saved_data["dtypes"] = std::vector<int64_t>{static_cast<int64_t>(yk.scalar_type()),
                                                     static_cast<int64_t>(yu.scalar_type()),
                                                     static_cast<int64_t>(y.scalar_type())};
    // A term needs a gradient only when an input it depends on does, as in the reference: intra on yk and
    // yu, inter on h, masked on yk and y, unmasked on yu and y (so that intra.backward() with only h
    // trainable raises instead of silently doing nothing).
    const bool r_yk = yk.requires_grad(), r_yu = yu.requires_grad(), r_y = y.requires_grad(), r_h = h.requires_grad();
    variable_list constant{teacher, alpha, saved_preds, saved_h};
    if (!r_yk && !r_yu) constant.push_back(intra);
    if (!r_h) constant.push_back(inter);
    if (!r_yk && !r_y) constant.push_back(masked);
    if (!r_yu && !r_y) constant.push_back(unmasked);
    ctx->mark_non_differentiable(constant);
    // Unused outputs arrive undefined (the kernel reads them as zero) instead of zero tensors that autograd
    // would otherwise allocate and fill, (M, B, D)-sized for saved_h.
    ctx->set_materialize_grads(false);
    return {loss, intra, inter, masked, unmasked, teacher, alpha, saved_preds, saved_h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mim_fast::kgs_loss_backward", "")
                         .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                             const Opt&, const Opt&, const Opt&, const Opt&, const Opt&, const Tensor&, const Tensor&,
                             at::ArrayRef<double>, at::ScalarType, at::ScalarType, at::ScalarType)>();
    check_no_create_graph("kgs_loss");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &saved_preds = saved[0], &saved_h = saved[1];
    const bool need[4] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                          ctx->needs_input_grad(3)};
    // (sym_numel: under torch.compile with dynamic shapes the sizes are symbolic)
    TORCH_CHECK(!((need[0] || need[1] || need[2]) && saved_preds.sym_numel() == 0) && !(need[3] && saved_h.sym_numel() == 0),
                "kgs_loss_forward was called with grad_preds/grad_h off for an input that requires grad: call "
                "mim_fast.kgs_loss, which sets them from requires_grad");
    auto reached = [&](std::initializer_list<int> which) {
      for (int k : which)
        if (grads[k].defined()) return true;
      return false;
    };
    // An input gets a gradient only from the terms that gradients reached (undefined otherwise, as the
    // reference's autograd graph gives): back-propagating only `masked` does not touch ∂L/∂h.
    // grads: 0 loss, 1 intra, 2 inter, 3 masked, 4 unmasked
    const bool want[4] = {need[0] && reached({0, 1, 3}), need[1] && reached({0, 1, 4}), need[2] && reached({0, 3, 4}),
                          need[3] && reached({0, 2})};
    variable_list out(12);
    if (!want[0] && !want[1] && !want[2] && !want[3]) return out;  // e.g. only `inter` reached, h frozen
    auto opt = [&](int k) { return grads[k].defined() ? Opt(grads[k]) : Opt(); };
    const Tensor empty = saved_preds.new_empty({0});
    const std::vector<double> weights = ctx->saved_data["weights"].toDoubleVector();
    const std::vector<int64_t> dt = ctx->saved_data["dtypes"].toIntVector();
    auto [gyk, gyu, gy, gh] = op.call(opt(0), opt(1), opt(2), opt(3), opt(4),
                                      (want[0] || want[1] || want[2]) ? saved_preds : empty,
                                      want[3] ? saved_h : saved_h.new_empty({0}), weights,
                                      static_cast<at::ScalarType>(dt[0]), static_cast<at::ScalarType>(dt[1]),
                                      static_cast<at::ScalarType>(dt[2]));
    if (want[0]) out[0] = gyk;
    if (want[1]) out[1] = gyu;
    if (want[2]) out[2] = gy;
    if (want[3]) out[3] = gh;
    return out;
  }
};

KgsOut kgs_loss_forward_autograd(const Tensor& yk, const Tensor& yu, const Tensor& y, const Tensor& h, bool per_sample,
                                 double kd_scale, bool kd_divide_T, at::ArrayRef<double> weights,
                                 c10::string_view reduction, double eps, bool grad_preds, bool grad_h) {
  const variable_list o = KgsLoss::apply(yk, yu, y, h, per_sample, kd_scale, kd_divide_T, weights, reduction, eps,
                                         grad_preds, grad_h);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8]};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// dropout_apply: y = x·m(key, index); the backward is the same op applied to the gradient (the mask is
// regenerated from the saved index and key: nothing x-sized is saved). The eager common call of
// mim_fast.dropout comes here; torch.compile and export go through the Python op mim_fast::dropout.
// ---------------------------------------------------------------------------------------------------
const c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, int64_t, double, int64_t)>& dropout_apply_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mim_fast::dropout_apply", "")
                             .typed<Tensor(const Tensor&, const Tensor&, int64_t, double, int64_t)>();
  return op;
}

class DropoutApply : public torch::autograd::Function<DropoutApply> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& index, int64_t key, double p,
                        int64_t batch_dim) {
    ctx->save_for_backward({index});
    ctx->saved_data["key"] = key;
    ctx->saved_data["p"] = p;
    ctx->saved_data["batch_dim"] = batch_dim;
    at::AutoDispatchBelowADInplaceOrView guard;
    return dropout_apply_op().call(x, index, key, p, batch_dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(5);
    if (!ctx->needs_input_grad(0) || !grads[0].defined()) return out;
    // through autograd again: the backward of this linear map is differentiable (double backward)
    out[0] = dropout_apply_op().call(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["key"].toInt(),
                     ctx->saved_data["p"].toDouble(), ctx->saved_data["batch_dim"].toInt());
    return out;
  }
};

Tensor dropout_apply_autograd(const Tensor& x, const Tensor& index, int64_t key, double p, int64_t batch_dim) {
  return DropoutApply::apply(x, index, key, p, batch_dim);
}

std::tuple<Tensor, Tensor, Tensor> purify_gate_call(const Tensor& x, const Tensor& logits, const Opt& noise,
                                                    int64_t seed, int64_t offset, bool batch_first,
                                                    c10::string_view mode, c10::string_view activation,
                                                    double loc_bias, double beta, double zeta_gamma, double gamma,
                                                    double threshold, double pen_shift) {
  const Tensor xs = batch_first ? x.transpose(0, 1) : x;  // (T, B, D) view: the kernels read strides
  GateOut out = gate_forward_op().call(xs, logits, noise, c10::nullopt, seed, offset, mode, activation, loc_bias,
                                       beta, zeta_gamma, gamma, threshold, pen_shift);
  return {std::move(std::get<0>(out)), std::move(std::get<1>(out)), std::move(std::get<2>(out))};
}

TORCH_LIBRARY_IMPL(mim_fast, Autograd, m) {
  m.impl("dropout_apply", &dropout_apply_autograd);
  m.impl("purify_gate_forward", &purify_gate_forward_autograd);
  m.impl("kgs_loss_forward", &kgs_loss_forward_autograd);
  // The backward ops have no derivative of their own: called directly with inputs that need a gradient,
  // differentiating through one raises "the derivative ... is not implemented", instead of the dispatcher's
  // default for an op without an autograd kernel (a warning and a silently missing second derivative).
  // (The Triton backward ops are torch.library.custom_op, which raise likewise.)
  m.impl("purify_gate_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("kgs_loss_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("kgs_loss_heads_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace mim_fast
