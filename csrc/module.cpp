// The mim_fast._C extension: the op schemas of the mim_fast torch.library namespace (the contract
// every backend implements; kernels register per device in their own files) and a pybind11 module
// that reports how this binary was built.
#include "autograd.h"
#include "cpu_memory.h"
#include <ATen/Config.h>
#include <ATen/Dispatch.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/python.h>  // the at::Tensor <-> torch.Tensor pybind11 caster

#if MIM_FAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

TORCH_LIBRARY(mim_fast, m) {
  // Counter-based uniform noise (Philox4x32-10, Triton's tl.rand). counters: int64, any shape.
  m.def("philox_uniform(Tensor counters, int seed) -> Tensor");
  // The fused purification gate (SPEC §1); x is (T, B, D) with any strides. Hyper-parameters arrive
  // folded (zeta_gamma = ζ − γ, pen_shift = β·ln ratio) as the Python wrapper computes them.
  // Returns (pooled, penalty, gate, ste, dq, inv_count); the last three are saved for the backward.
  m.def(
      "purify_gate_forward(Tensor x, Tensor logits, Tensor? noise, Tensor? lengths, int seed, int offset, "
      "str mode, str activation, float loc_bias, float beta, float zeta_gamma, float gamma, float threshold, "
      "float pen_shift) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_logits); grad_x is a (0,) tensor, and never written, when needs_grad_x is false
  // (MIM's mask-learner update asks for the logits' gradient only: skipping ∂L/∂x saves a third of the
  // backward's bytes).
  m.def(
      "purify_gate_backward(Tensor grad_pooled, Tensor grad_penalty, Tensor x, Tensor gate, Tensor ste, "
      "Tensor dq, Tensor inv_count, Tensor? lengths, str activation, bool needs_grad_x=True) -> (Tensor, Tensor)");
  // Fused counter-based dropout (mim_fast/ops/dropout.py, csrc/dropout.cpp): y = x·1[u ≥ p]/(1 − p) with
  // u = philox_uniform(key, index[b]·S + j) drawn in place; x viewed as (outer, B, inner) around batch_dim.
  m.def("dropout_apply(Tensor x, Tensor index, int key, float p, int batch_dim) -> Tensor");
  // Test access to the shared float32 math (exp, log, sigmoid, tanh) of kernels/mim_math.h.
  m.def("_math32(Tensor x, str fn) -> Tensor");
  // The fused KGS loss (SPEC §2); yk, yu (M, B), y (B,), h (M, B, D), any strides. weights = (w_intra,
  // w_inter, w_masked, w_unmasked); reduction "mean" | "sum" | "none". grad_preds / grad_h: compute
  // and return the per-term gradients for the predictions / for h in the same pass (else (0,) tensors).
  // Returns (loss, intra, inter, masked, unmasked, teacher, alpha, saved_preds (4, M, B), saved_h (M, B, D)).
  m.def(
      "kgs_loss_forward(Tensor yk, Tensor yu, Tensor y, Tensor h, bool per_sample, float kd_scale, "
      "bool kd_divide_T, float[] weights, str reduction, float eps, bool grad_preds, bool grad_h) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Scales the saved per-term gradients by the incoming gradients of (loss, intra, inter, masked,
  // unmasked), each a scalar, (B,) or None. Returns (grad_yk, grad_yu, grad_y, grad_h).
  m.def(
      "kgs_loss_backward(Tensor? grad_loss, Tensor? grad_intra, Tensor? grad_inter, Tensor? grad_masked, "
      "Tensor? grad_unmasked, Tensor saved_preds, Tensor saved_h, float[] weights, ScalarType yk_dtype, "
      "ScalarType yu_dtype, ScalarType y_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  // kgs_loss_with_heads: the predictions come from per-modality heads inside the fused pass,
  // yk[m, i] = h_masked[m, i]·weight[m] + bias[m], yu likewise from h_unmasked; weight (M, D), bias (M,).
  // Same outputs as kgs_loss_forward (saved_h is ∂inter/∂h_masked).
  m.def(
      "kgs_loss_heads_forward(Tensor h_masked, Tensor h_unmasked, Tensor weight, Tensor bias, Tensor y, "
      "bool per_sample, float kd_scale, bool kd_divide_T, float[] weights, str reduction, float eps, "
      "bool grad_preds, bool grad_h) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // needs: which of (grad_h_masked, grad_h_unmasked, grad_weight, grad_bias, grad_y) to compute (others
  // are returned as (0,) tensors). Returns them in that order.
  m.def(
      "kgs_loss_heads_backward(Tensor? grad_loss, Tensor? grad_intra, Tensor? grad_inter, Tensor? grad_masked, "
      "Tensor? grad_unmasked, Tensor saved_preds, Tensor saved_h, Tensor h_masked, Tensor h_unmasked, "
      "Tensor weight, float[] weights, bool[5] needs, ScalarType bias_dtype, ScalarType y_dtype) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mim_fast compiled kernels (the ops themselves are reached through torch.ops.mim_fast)";
  m.def("build_info", []() {
    py::dict info;
    info["torch_version"] = MIM_FAST_TORCH_VERSION;
    info["with_cuda"] = static_cast<bool>(MIM_FAST_WITH_CUDA);
#if MIM_FAST_WITH_CUDA
    info["cuda_runtime_version"] = CUDART_VERSION;  // e.g. 13000 for CUDA 13.0
    info["cuda_archs"] = MIM_FAST_CUDA_ARCHS;
#else
    info["cuda_runtime_version"] = py::none();
    info["cuda_archs"] = py::none();
#endif
    // CPU kernels use at::parallel_for, i.e. torch's own thread pool (OpenMP in the official wheels):
    // no second OpenMP runtime is linked, and torch.set_num_threads governs our kernels too.
    info["with_openmp"] = static_cast<bool>(AT_PARALLEL_OPENMP);
#if defined(__clang__)
    info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = "gcc " __VERSION__;
#else
    info["compiler"] = "unknown";
#endif
    return info;
  });
  // The public gate's noise check on CPU tensors, a pass over B·T values in ~1 µs: torch.aminmax and
  // two comparisons of its results cost ~20 µs per call on the CI VM, as much as a tenth of the op at MIM's
  // size. True when every value v satisfies 0 < v < 1 (so NaN fails).
  m.def("in_open_unit_interval", [](const at::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu(), "in_open_unit_interval: a CPU tensor is needed, got one on ", t.device());
    const at::Tensor c = t.contiguous();
    bool ok = true;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "in_open_unit_interval", [&] {
      const scalar_t* p = c.data_ptr<scalar_t>();
      const int64_t n = c.numel();
      for (int64_t i = 0; i < n && ok; ++i) {
        const double v = static_cast<double>(p[i]);
        ok = v > 0.0 && v < 1.0;
      }
    });
    return ok;
  }, "True when every value of the CPU float tensor lies in the open interval (0, 1) (NaN does not).");
  // The index check of dropout's common call on a CPU int64 tensor: true when 0 <= v <= hi for every v,
  // in one pass (min and max and two item() calls cost ~20 µs a call, more than the kernel at MIM's size).
  m.def("int64_in_range", [](const at::Tensor& t, int64_t hi) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong,
                "int64_in_range: a CPU int64 tensor is needed, got ", t.scalar_type(), " on ", t.device());
    const at::Tensor c = t.contiguous();
    const int64_t* p = c.data_ptr<int64_t>();
    const int64_t n = c.numel();
    bool ok = true;
    for (int64_t i = 0; i < n; ++i) ok &= p[i] >= 0 && p[i] <= hi;
    return ok;
  }, "True when every value of the CPU int64 tensor lies in [0, hi].");
  // purify_gate's eager common call, past its Python checks (csrc/autograd.h)
  m.def(
      "purify_gate_call",
      [](const at::Tensor& x, const at::Tensor& logits, const std::optional<at::Tensor>& noise, int64_t seed,
         int64_t offset, bool batch_first, const std::string& mode, const std::string& activation, double loc_bias,
         double beta, double zeta_gamma, double gamma, double threshold, double pen_shift) {
        return mim_fast::purify_gate_call(x, logits, noise, seed, offset, batch_first, mode, activation, loc_bias,
                                          beta, zeta_gamma, gamma, threshold, pen_shift);
      },
      py::call_guard<py::gil_scoped_release>(),
      "purify_gate_forward's (pooled, penalty, gate) for arguments mim_fast.purify_gate has checked.");
  m.def("cpu_cache_info", []() {
    const auto st = mim_fast::LargeBufferPool::get().stats();
    py::dict d;
    d["idle_bytes"] = st.idle_bytes;
    d["idle_blocks"] = st.idle_blocks;
    d["cap_bytes"] = st.cap_bytes;
    d["hits"] = st.hits;
    d["misses"] = st.misses;
    return d;
  }, "The CPU large-buffer pool: idle bytes/blocks kept, the cap, and hits/misses so far.");
  m.def("cpu_cache_empty", []() { return mim_fast::LargeBufferPool::get().empty_cache(); },
        "Free the pool's idle buffers; returns the bytes freed.");
}
