// What csrc/autograd.cpp offers the pybind11 module (csrc/module.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace mim_fast {

// purify_gate's eager common call (mim_fast/ops/purify_gate.py _common_call), which has already checked every
// argument and picked the C++ backend: purify_gate_forward called through the dispatcher (so its C++
// autograd node, dispatch modes and the profiler see the same op) instead of torch.ops' boxed call from
// Python; returns (pooled, penalty, gate), the three public outputs. x is (T, B, D), or (B, T, D) with
// batch_first; the hyper-parameters arrive folded as the op takes them (zeta_gamma = ζ − γ, pen_shift).
std::tuple<at::Tensor, at::Tensor, at::Tensor> purify_gate_call(
    const at::Tensor& x, const at::Tensor& logits, const c10::optional<at::Tensor>& noise, int64_t seed,
    int64_t offset, bool batch_first, c10::string_view mode, c10::string_view activation, double loc_bias,
    double beta, double zeta_gamma, double gamma, double threshold, double pen_shift);

}  // namespace mim_fast
